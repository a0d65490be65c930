# syntax=docker/dockerfile:1
# The sluice image: a multi-stage build to a minimal runtime that holds the binary, glibc, the
# CA bundle and nothing else (no shell, no package manager), running as user 65532.
#
#   buildah bud -t sluice:0.1.0 .          # or: podman build / docker build -t sluice:0.1.0 .
#   podman run --rm sluice:0.1.0 --version
#   podman run --rm -v "$PWD/config:/work/config:ro" -w /work sluice:0.1.0 check -c config/sluice.example.yaml
#
# README.md ("Container image") says how to push it and point the Helm chart at it. Both base
# images can be replaced (a mirror, or a pinned digest) with --build-arg.

# Build on the runtime's Debian release (bookworm: glibc 2.36), so the binary's glibc is there.
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
# Debian 12 with glibc, libgcc, ca-certificates and tzdata; user `nonroot` is 65532.
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# .dockerignore lets only the manifests, src/ and benches/ (the manifest names the benches) in.
COPY . .
# The registry and target caches survive between builds (BuildKit, buildah and podman all take
# cache mounts); the binary is copied out of the cached target/.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
    && install -D -m 0755 target/release/sluice /out/sluice

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/sluice /usr/local/bin/sluice
USER 65532:65532
# Proxy and admin listeners (the config decides; these are its defaults).
EXPOSE 3128 9901
# `run` and `check` read this when no -c is given (the chart passes --config anyway).
ENV SLUICE_CONFIG=/etc/sluice/sluice.yaml
ENTRYPOINT ["sluice"]
CMD ["run"]
