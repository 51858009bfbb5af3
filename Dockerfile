# pop3d's container image: see docs/container.md.
#
#   docker build -t pop3d .
#   docker run -p 1110:110 pop3d          # the demo: curl pop3://demo:demo@127.0.0.1:1110/1
#
# Two stages on Debian's own python3: the first makes a venv and pip-installs pop3d
# into it, the second copies that venv into a clean image without pip's tools.

FROM debian:bookworm-slim AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# pip uses its own CA bundle unless told otherwise; the system one includes any local CA (a proxy's).
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/pop3d
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pop3d ./pop3d
COPY admin ./admin
# /docs serves four files of Swagger UI's distribution (pop3d.admin.docs.ASSETS): the editor
# bundles and source maps beside them are 23 MB the image does not need.
RUN /opt/pop3d/bin/pip install . \
    && /opt/pop3d/bin/pip uninstall -y pip setuptools \
    && find /opt/pop3d/lib/python3*/site-packages/swagger_ui/static -type f \
        ! -name swagger-ui-bundle.js ! -name swagger-ui.css ! -name 'favicon-*.png' -delete \
    && /opt/pop3d/bin/pop3d --version

FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && groupadd --system --gid 110 pop3d \
    && useradd --system --uid 110 --gid 110 --home-dir /var/lib/pop3d --shell /usr/sbin/nologin pop3d \
    && mkdir -p /etc/pop3d/tls /var/lib/pop3d/mail /run/pop3d \
    && chown pop3d:pop3d /var/lib/pop3d /var/lib/pop3d/mail \
    && chmod 700 /run/pop3d
COPY --from=build /opt/pop3d /opt/pop3d
COPY docker/entrypoint.py docker/healthcheck.py /usr/local/lib/pop3d-container/
ENV PATH=/opt/pop3d/bin:$PATH PYTHONUNBUFFERED=1
# Started as root only to bind 110 and 995: pop3d then becomes the user pop3d (110:110)
# before it reads a file or serves a client (the entrypoint passes POP3D_USER=pop3d).
VOLUME ["/etc/pop3d", "/var/lib/pop3d/mail"]
EXPOSE 110 995 8110
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/pop3d/bin/python", "/usr/local/lib/pop3d-container/healthcheck.py"]
ENTRYPOINT ["/opt/pop3d/bin/python", "/usr/local/lib/pop3d-container/entrypoint.py"]
CMD ["serve"]
