# syntax=docker/dockerfile:1
# resplica container image.
#   docker build -t resplica .
#   docker run --rm -p 7380:7380 -v $PWD/my.toml:/etc/resplica/resplica.toml resplica
# The default config (conf/resplica.toml) is a single node in front of a Redis on
# 127.0.0.1:6379, i.e. a Redis in the same pod / network namespace (the sidecar case).
#
# resplica uses io_uring where allowed and falls back to epoll: Docker 25+ and
# containerd 2.0 default seccomp profiles block io_uring_*, which is fine.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/resplica /out/resplica

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 resplica \
 && useradd --system --uid 10001 --gid resplica --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin resplica
COPY --from=builder /out/resplica /usr/local/bin/resplica
COPY conf/resplica.toml /etc/resplica/resplica.toml
USER resplica:resplica
# 7380 clients, 7381 peer link (pairs), 7382 admin (status)
EXPOSE 7380 7381 7382
ENTRYPOINT ["resplica"]
CMD ["--config", "/etc/resplica/resplica.toml"]
