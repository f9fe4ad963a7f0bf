# The Tollgate reference server: built in the official Rust image, run in a
# distroless image as a non-root user (the last stage, the default target).
# The `pgbouncer` stage is the compose file's pooler: Debian's PgBouncer
# run by the same script the tests and scripts/services.sh use.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tollgate-server \
 && cp target/release/tollgate-server /tollgate-server

FROM debian:bookworm-slim AS pgbouncer
RUN apt-get update \
 && apt-get install -y --no-install-recommends pgbouncer postgresql-client \
 && rm -rf /var/lib/apt/lists/*
COPY scripts/pgbouncer.sh /usr/local/bin/tollgate-pgbouncer
ENV PG_HOST=postgres LISTEN_HOST=*
EXPOSE 6432
ENTRYPOINT ["bash", "/usr/local/bin/tollgate-pgbouncer", "--foreground", "6432", "20", "/var/lib/tollgate-pgbouncer"]

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /tollgate-server /usr/local/bin/tollgate-server
USER nonroot
ENV LISTEN_ADDR=0.0.0.0:8080 LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tollgate-server"]
