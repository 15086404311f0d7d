# hubcast in a container. Multi-stage: built with Rust, run from a slim Debian as a
# non-root user; streams in the /var/lib/hubcast volume.
#
#   docker build -t hubcast .
#   docker run -p 3000:3000 -v $PWD/auth.toml:/etc/hubcast/auth.toml:ro hubcast --auth /etc/hubcast/auth.toml
#
# It listens on 0.0.0.0 (a container's loopback cannot be reached from outside), so
# protected mode asks for authentication (--auth, --jwt-key); on a network you trust,
# `docker run ... hubcast --insecure` instead. Not built on this project's CI machines,
# which have no Docker engine.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin hubcast \
    && strip target/release/hubcast

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/hubcast --create-home hubcast
COPY --from=build /src/target/release/hubcast /usr/local/bin/hubcast
COPY deploy/hubcast.toml /etc/hubcast/hubcast.toml
USER hubcast
WORKDIR /var/lib/hubcast
ENV HUBCAST_HOST=0.0.0.0 HUBCAST_DATA_DIR=/var/lib/hubcast
VOLUME ["/var/lib/hubcast"]
EXPOSE 3000 8080
ENTRYPOINT ["hubcast", "serve", "--config", "/etc/hubcast/hubcast.toml"]
