# flagproxy: feature-flag reverse proxy.
#
#   docker build -t flagproxy .
#   docker run --rm -p 8080:8080 -e FLAGPROXY_ORIGINS=http://origin.internal:9000 flagproxy
#
# Origins come from FLAGPROXY_ORIGINS: comma-separated [PREFIX=]URL, e.g.
#   FLAGPROXY_ORIGINS="/api=http://api:9000,http://web:3000"
# (or from `--origin` arguments / a TOML file given with `--config config/<file>.toml`).
# Every other setting can be overridden as FLAGPROXY_<SECTION>_<KEY>, e.g. FLAGPROXY_STORE_REDIS_URL.
# Arguments after the image name replace the default CMD, so keep `--host 0.0.0.0` when passing your own.
#
# BASE: any Debian-like image with python3 >= 3.11 and its venv module (`make docker` and
# tests/test_docker_image.py build it; docs/operations.md).
ARG BASE=python:3.12-slim

# --- build: the package and its runtime dependencies (no [test] extra) in a venv -------------------
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY proxy /src/proxy
RUN python3 -m venv /opt/flagproxy \
    && /opt/flagproxy/bin/pip install /src \
    && /opt/flagproxy/bin/pip uninstall --yes pip setuptools

# --- runtime: the venv, the seeds and example configs; no compilers, no pip, not root -------------
FROM ${BASE}
ENV PATH=/opt/flagproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLAGPROXY_EXPERIMENTS_PATH=/var/lib/flagproxy/experiments.sqlite3

RUN groupadd --system --gid 10001 flagproxy \
    && useradd --system --no-log-init --uid 10001 --gid flagproxy --home-dir /app --shell /usr/sbin/nologin flagproxy \
    && install --directory --owner flagproxy --group flagproxy --mode 0750 /var/lib/flagproxy

COPY --from=build /opt/flagproxy /opt/flagproxy

# Relative paths in the settings ([store] flags_file = "seeds/flags.json") resolve against /app, which
# the process cannot write: what it writes goes to the volume /var/lib/flagproxy. The environment
# beats a settings file, so FLAGPROXY_EXPERIMENTS_PATH above wins over [experiments] path: pass -e
# to move it.
WORKDIR /app
COPY seeds ./seeds
COPY config ./config
VOLUME ["/var/lib/flagproxy"]

USER flagproxy
EXPOSE 8080

# No curl in the image: the venv's python asks GET /__flags/healthz, on FLAGPROXY_SERVER_CONTROL_PORT
# when set (else FLAGPROXY_SERVER_PORT, else 8080); assumes the control prefix /__flags.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; e = os.environ.get; p = e('FLAGPROXY_SERVER_CONTROL_PORT', '0'); p = p if p not in ('', '0') else e('FLAGPROXY_SERVER_PORT', '8080'); urllib.request.urlopen(f'http://127.0.0.1:{p}/__flags/healthz', timeout=2)"]

ENTRYPOINT ["flagproxy", "serve"]
CMD ["--host", "0.0.0.0"]
