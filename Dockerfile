# syntax=docker/dockerfile:1
# Ferry broker and CLI image. Not built in CI yet (no container engine on the CI machines).
#   docker build -t ferry:0.1.0 .
#   docker run --rm -p 50051:50051 ferry:0.1.0 serve --listen 0.0.0.0:50051 --data-dir /var/lib/ferry

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY services ./services
COPY clients ./clients
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels ferry-transfer \
 && groupadd --gid 10001 ferry \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ferry \
 && install -d -o 10001 -g 10001 /var/lib/ferry
USER 10001:10001
WORKDIR /var/lib/ferry
EXPOSE 50051
ENTRYPOINT ["ferry"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--data-dir", "/var/lib/ferry"]
