# Reads only the dirty extents of an NBD export (the `qemu:dirty-bitmap:*`
# meta context), up to 16 requests of at most 4 MiB in flight, data discarded.
# Usage: /usr/bin/python3 dirty_read.py URL CONTEXT ; prints the bytes read.
import sys

import nbd

url, ctx = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.add_meta_context(ctx)
h.connect_uri(url)
size = h.get_size()
extents = []
pos = 0
while pos < size:
    ends = []

    def status(metacontext, offset, entries, err):
        if metacontext != ctx:
            return 0
        o = offset
        for k in range(0, len(entries), 2):
            length, flags = entries[k], entries[k + 1]
            if flags & 1:
                extents.append((o, length))
            o += length
        ends.append(o)
        return 0

    h.block_status(min(size - pos, 1 << 30), pos, status)
    pos = max(ends) if ends else size

chunks = []
for off, length in extents:
    while length > 0:
        n = min(length, 4 << 20)
        chunks.append((off, n))
        off += n
        length -= n

total = 0
pending = {}
i = 0
while i < len(chunks) or pending:
    while i < len(chunks) and len(pending) < 16:
        off, n = chunks[i]
        pending[h.aio_pread(nbd.Buffer(n), off)] = n
        i += 1
    h.poll(-1)
    for cookie in [c for c in pending if h.aio_command_completed(c)]:
        total += pending.pop(cookie)
print(total)
