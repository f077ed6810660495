# The kv images: `controller` and `worker`, each one static binary in an
# otherwise empty image, running as an unprivileged user.
#
# With internet access (BuildKit, the default builder of current Docker):
#   docker build --target controller -t distributed-kv-controller:latest .
#   docker build --target worker     -t distributed-kv-worker:latest .
#
# Without internet access (no base image can be pulled), build the static
# binaries on the host and package them — `scripts/build-images` does both:
#   RUSTFLAGS='-C target-feature=+crt-static' cargo build --profile dist --locked \
#     --target x86_64-unknown-linux-gnu -p kv-controller -p kv-worker   # (your host's target)
#   mkdir -p dist && cp target/x86_64-unknown-linux-gnu/dist/kv-{controller,worker} dist/
#   docker build --target controller-from-host -t distributed-kv-controller:latest .
#   docker build --target worker-from-host     -t distributed-kv-worker:latest .
# The *-from-host stages come first in this file because Docker's classic
# builder runs every stage before its target: these never reach the stage
# that needs the Rust image.

FROM scratch AS controller-from-host
COPY dist/kv-controller /kv-controller
USER 65534:65534
EXPOSE 8000/tcp 8000/udp
ENTRYPOINT ["/kv-controller"]

FROM scratch AS worker-from-host
COPY dist/kv-worker /kv-worker
# The data dir's mount point, owned by the worker's user: a volume mounted
# there (compose's named volumes) starts out writable by it.
COPY --chown=65534:65534 dist/data /var/lib/kv
USER 65534:65534
EXPOSE 8001/tcp 8002/tcp
ENTRYPOINT ["/kv-worker"]

# Compiles static release binaries for the platform being built (amd64 or
# arm64: Minikube on an Apple-silicon laptop runs arm64 images).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS='-C target-feature=+crt-static' cargo build --profile dist --locked \
      --target "$target" -p kv-controller -p kv-worker \
 && mkdir -p /dist/data \
 && cp "target/$target/dist/kv-controller" "target/$target/dist/kv-worker" /dist/

FROM scratch AS controller
COPY --from=build /dist/kv-controller /kv-controller
USER 65534:65534
EXPOSE 8000/tcp 8000/udp
ENTRYPOINT ["/kv-controller"]

FROM scratch AS worker
COPY --from=build /dist/kv-worker /kv-worker
COPY --from=build --chown=65534:65534 /dist/data /var/lib/kv
USER 65534:65534
EXPOSE 8001/tcp 8002/tcp
ENTRYPOINT ["/kv-worker"]
