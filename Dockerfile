# The Tollgate reference server: built in the official Rust image, run in a
# distroless image as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tollgate-server \
 && cp target/release/tollgate-server /tollgate-server

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /tollgate-server /usr/local/bin/tollgate-server
USER nonroot
ENV LISTEN_ADDR=0.0.0.0:8080 LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tollgate-server"]
