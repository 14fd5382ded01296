# syntax=docker/dockerfile:1.7
# cairn-agent: the node DaemonSet. It runs qemu-img / qemu-nbd (offline bitmap
# work and offline backups) and nbdcopy, so the final stage is Debian with QEMU
# 10's qemu-utils from bookworm-backports (the same QEMU major the nodes and
# the tests run).
#
# The image runs as root (uid 0): QMP sockets and disk images on typical nodes
# are owned by root or by QEMU's own user (libvirt-qemu, qemu) with owner-only
# modes, and backup files must be readable by that user. A fixed non-root uid
# could reach none of them. The chart compensates: no privileged mode, all
# capabilities dropped except DAC_OVERRIDE and CHOWN (FOWNER optional), no
# privilege escalation, read-only root filesystem, RuntimeDefault seccomp, and
# only the configured host paths mounted.
#
# Build from the repository root:
#   docker build -f docker/agent.Dockerfile -t cairn-agent .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY crds crds
COPY operator operator
COPY agent agent
COPY nbd nbd
COPY repository repository
COPY e2e e2e
COPY xtask xtask
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo build --release --locked -p cairn-agent

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="cairn-agent" \
      org.opencontainers.image.source="https://github.com/cairn-dev/cairn" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN echo "deb http://deb.debian.org/debian bookworm-backports main" \
        > /etc/apt/sources.list.d/bookworm-backports.list \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -t bookworm-backports qemu-utils \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libnbd-bin ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && qemu-img --version
COPY --from=builder /src/target/release/cairn-agent /usr/local/bin/cairn-agent
USER 0:0
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cairn-agent"]
