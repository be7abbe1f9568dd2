# keyvalue-inmemory: the provider, its signed archive and the xtask tool in one small image.
#
#   docker build -t keyvalue-inmemory .
#   docker run --rm -it keyvalue-inmemory          # simulation: nats-server + host data, no host
#   docker create --name kv keyvalue-inmemory \
#     && docker cp kv:/opt/keyvalue-inmemory/keyvalue-inmemory.par.gz build/ && docker rm kv
#
# Reproducible inputs: a pinned toolchain image, `--locked` builds from Cargo.lock. The archive
# is signed with keys made in the build stage (they never reach the runtime image); for keys
# of your own, run `cargo xtask par --release` outside Docker.

# 1. Dependencies only: manifests and empty sources, so this layer is rebuilt only when
#    Cargo.toml or Cargo.lock change.
FROM rust:1.95.0-slim-bookworm AS deps
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY store/Cargo.toml store/
COPY test-support/Cargo.toml test-support/
COPY xtask/Cargo.toml xtask/
RUN mkdir -p src store/src store/benches test-support/src xtask/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs store/src/lib.rs test-support/src/lib.rs \
    && echo 'fn main() {}' > xtask/src/main.rs \
    && echo 'fn main() {}' > store/benches/engine.rs \
    && cargo build --release --locked --package keyvalue-inmemory --package xtask \
    && rm -rf src store/src store/benches test-support/src xtask/src

# 2. The provider and its archive (no start-up check here: it needs a nats-server).
FROM deps AS build
COPY . .
RUN touch src/main.rs src/lib.rs store/src/lib.rs test-support/src/lib.rs xtask/src/main.rs \
    && cargo build --release --locked --package keyvalue-inmemory --package xtask \
    && target/release/xtask par --binary target/release/keyvalue-inmemory \
        --out /out --keys /tmp/keys --no-start

# 3. Runtime: the binaries, the archive and a nats-server, run as an unprivileged user.
FROM debian:bookworm-slim AS runtime
COPY --from=nats:2.10.24 /nats-server /usr/local/bin/nats-server
COPY --from=build /src/target/release/keyvalue-inmemory /src/target/release/xtask /usr/local/bin/
COPY --from=build /out/keyvalue-inmemory.par.gz /opt/keyvalue-inmemory/
USER 10001:10001
WORKDIR /tmp
# xtask forwards Ctrl-C (SIGINT) to the provider as the host's shutdown request.
STOPSIGNAL SIGINT
ENTRYPOINT ["xtask"]
CMD ["run", "--binary", "/usr/local/bin/keyvalue-inmemory"]
