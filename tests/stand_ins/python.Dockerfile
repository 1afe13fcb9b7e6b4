# A local stand-in for the official python image, built by scripts/docker-images
# on machines that cannot pull from a container registry: Debian's python3,
# pip and venv on a Debian base made with debootstrap. `python` and `pip` on
# PATH are a virtualenv's (Debian's own Python refuses `pip install` outside
# one), so `pip install .` works as it does in the official image. The
# machine's local CA certificates (ca/) are trusted, as they are on the
# machine, so that pip reaches the package index the way the machine does.
ARG BASE
FROM ${BASE}
ARG STANDS_FOR
LABEL org.opencontainers.image.title="python" \
      org.opencontainers.image.description="Local stand-in for ${STANDS_FOR}: Debian's python3, pip and venv, built by scripts/docker-images" \
      sprockets-status-consul.stand-in="${STANDS_FOR}"
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        ca-certificates python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
CMD ["python3"]
