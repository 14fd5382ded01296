/* cairn-iowriter: random 4 KiB O_DIRECT writes into a file for a while, as a
 * guest workload for the guest-impact benchmark (`cargo xtask bench`).
 *
 *   cairn-iowriter FILE SIZE_MIB SECONDS
 *
 * Creates FILE of SIZE_MIB if needed (filled with data, so writes land in
 * allocated blocks), then writes one 4 KiB block at a time at random aligned
 * offsets (O_DIRECT | O_DSYNC: every write reaches the virtual disk) for
 * SECONDS, and prints one line per 100 ms bucket ("b <ms> <writes>") and a
 * summary ("iops <n> p50_us <n> p99_us <n> max_us <n>"). Built statically by
 * build-guest.sh from this file. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static int cmp(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s FILE SIZE_MIB SECONDS\n", argv[0]);
        return 2;
    }
    uint64_t size = strtoull(argv[2], 0, 10) << 20;
    uint64_t secs = strtoull(argv[3], 0, 10);
    void *buf;
    if (posix_memalign(&buf, 4096, 1 << 20)) return 1;
    memset(buf, 0x5a, 1 << 20);
    int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
    if (fd < 0) { perror("open"); return 1; }
    off_t have = lseek(fd, 0, SEEK_END);
    for (uint64_t off = (uint64_t)have; off < size; off += 1 << 20)
        if (pwrite(fd, buf, 1 << 20, (off_t)off) != 1 << 20) { perror("fill"); return 1; }
    fsync(fd);
    close(fd);
    fd = open(argv[1], O_WRONLY | O_DIRECT | O_DSYNC);
    if (fd < 0) { perror("open O_DIRECT"); return 1; }
    uint64_t blocks = size / 4096, seed = 0x9e3779b97f4a7c15ull;
    size_t cap = 1 << 20, n = 0;
    uint32_t *lat = malloc(cap * sizeof *lat);
    uint32_t buckets[100000] = {0};
    uint64_t start = now_us(), end = start + secs * 1000000u, t;
    while ((t = now_us()) < end) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        if (pwrite(fd, buf, 4096, (off_t)((seed % blocks) * 4096)) != 4096) { perror("pwrite"); return 1; }
        uint64_t done = now_us();
        if (n < cap) lat[n] = (uint32_t)(done - t);
        n++;
        uint64_t b = (done - start) / 100000u;
        if (b < 100000) buckets[b]++;
    }
    double elapsed = (double)(now_us() - start) / 1e6;
    for (uint64_t b = 0; b * 100000u < secs * 1000000u && b < 100000; b++)
        printf("b %llu %u\n", (unsigned long long)(b * 100), buckets[b]);
    size_t m = n < cap ? n : cap;
    qsort(lat, m, sizeof *lat, cmp);
    printf("iops %.1f p50_us %u p99_us %u max_us %u\n", (double)n / elapsed,
           m ? lat[m / 2] : 0, m ? lat[m * 99 / 100] : 0, m ? lat[m - 1] : 0);
    return 0;
}
