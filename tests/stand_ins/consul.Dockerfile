# A local stand-in for HashiCorp's Consul image, built by scripts/docker-images
# on machines that cannot pull from a container registry: Debian's consul
# package (the binary the tests fetch) on a Debian base made with debootstrap.
# Like the official image, `agent ...` as the command runs `consul agent` with
# /consul/data and /consul/config, another consul subcommand runs consul, and
# anything else runs as it is; `consul` is on PATH for `docker exec`.
ARG BASE
FROM ${BASE}
ARG STANDS_FOR
ARG CONSUL_VERSION
LABEL org.opencontainers.image.title="consul" \
      org.opencontainers.image.version="${CONSUL_VERSION}" \
      org.opencontainers.image.description="Local stand-in for ${STANDS_FOR}: Debian's Consul ${CONSUL_VERSION}, built by scripts/docker-images" \
      sprockets-status-consul.stand-in="${STANDS_FOR}"
# one layer: usr/bin/consul, usr/local/bin/docker-entrypoint.sh, consul/data,
# consul/config
COPY root/ /
EXPOSE 8300 8301 8301/udp 8302 8302/udp 8500 8600 8600/udp
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["agent", "-dev", "-client", "0.0.0.0"]
