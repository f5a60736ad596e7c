# The process-mcp server itself, as a box: HTTP on 8765, processes run in this container.
#   pip wheel -w dist . && docker build -t process-mcp:latest -f Dockerfile dist   (with a registry)
#   scripts/build-image.sh                                                        (no registry)
# The build context is a directory of wheels: process-mcp's and its dependencies' (pip wheel fetches
# them from PyPI), so the build itself needs no network.
# BUILD_BASE needs Python 3.11+ with pip; BASE the same Python (the installed packages are copied over),
# and nothing else: no pip, no compilers.
ARG BUILD_BASE=python:3.11-slim
ARG BASE=python:3.11-slim

FROM ${BUILD_BASE} AS build
COPY *.whl /tmp/wheels/
RUN python3 -m pip install --no-cache-dir --no-compile --no-index --find-links /tmp/wheels \
        --target /opt/process-mcp process-mcp

FROM ${BASE}
COPY --from=build /opt/process-mcp /opt/process-mcp
# Any non-root uid may run it (docker run --user, Kubernetes runAsUser): the workspace is writable by
# all, each principal's directory in it private (0700) to the uid that made it. 10001 is the default.
RUN mkdir -p /workspace && chmod 1777 /workspace \
    && echo 'process-mcp:x:10001:10001:process-mcp:/workspace:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'process-mcp:x:10001:' >> /etc/group
ENV PYTHONPATH=/opt/process-mcp \
    PYTHONDONTWRITEBYTECODE=1 \
    PROCESS_TRANSPORT=http \
    PROCESS_HTTP_HOST=0.0.0.0 \
    PROCESS_HTTP_PORT=8765 \
    PROCESS_HTTP_ALLOWED_HOSTS=* \
    DEFAULT_WORKDIR=/workspace \
    SANDBOX_ENABLED=false
# SANDBOX_ENABLED=false: bwrap needs user namespaces, which a default container does not allow; the
# container is the box, and spawn/ps say sandboxed: false rather than claim a sandbox that is not there.
# PROCESS_HTTP_ALLOWED_HOSTS=*: clients reach the container by whatever name the platform gives it;
# every request still needs a token (PROCESS_AUTH_TOKENS_FILE, or OAuth).
USER 10001:10001
WORKDIR /workspace
VOLUME /workspace
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "process_mcp"]
