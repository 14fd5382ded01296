# syntax=docker/dockerfile:1.7
# cairn-operator: static-ish Rust binary on distroless (glibc, no shell, uid 65532).
# Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t cairn-operator .
# docker/operator.Dockerfile.dockerignore keeps target/ and .git out of the context.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Only what the workspace needs to resolve (every member's manifest and sources).
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
    cargo build --release --locked -p cairn-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="cairn-operator" \
      org.opencontainers.image.source="https://github.com/cairn-dev/cairn" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /src/target/release/cairn-operator /usr/local/bin/cairn-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cairn-operator"]
