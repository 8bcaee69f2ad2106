# syntax=docker/dockerfile:1
# The annstream image: `annstream run` by default, any other subcommand as the container command
# (e.g. `docker run --rm annstream:0.1.0 produce ads --synthetic 1000`).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/annstream
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY annstream ./annstream
COPY consumers ./consumers
COPY producers ./producers
RUN --mount=type=cache,target=/root/.cache/pip /opt/annstream/bin/pip install .
# compile the numba kernels into the image (cache=True), so a container starts in a second
RUN /opt/annstream/bin/python -c "import annstream.refresher as r; r.warm_up()"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/annstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 annstream \
    && useradd --system --uid 10001 --gid annstream --home-dir /var/lib/annstream \
        --no-create-home --shell /usr/sbin/nologin annstream \
    && mkdir -p /var/lib/annstream/snapshots /etc/annstream \
    && chown -R annstream:annstream /var/lib/annstream
COPY --from=build /opt/annstream /opt/annstream
COPY deploy/annstream.toml /etc/annstream/annstream.toml
USER annstream:annstream
WORKDIR /var/lib/annstream
EXPOSE 9108
ENTRYPOINT ["annstream"]
CMD ["run", "--config", "/etc/annstream/annstream.toml"]
