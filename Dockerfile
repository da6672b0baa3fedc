# The four Sealstream services (and `sealstream migrate`) in one image; docker-compose.yml picks
# the command. The local-stack launcher is not used inside containers.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sealstream ./sealstream
COPY schemas ./schemas
COPY ingest ./ingest
COPY encryptor ./encryptor
COPY indexer ./indexer
COPY reader ./reader
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 sealstream
USER sealstream
ENTRYPOINT ["sealstream"]
CMD ["--help"]
