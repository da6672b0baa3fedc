# One image for the four Sealstream services and `sealstream migrate`; docker-compose.yml picks
# the subcommand (`run ingest`, `migrate`, ...). The local-stack launcher is not used in here.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package is built from: no .venv, .stack or test data in the build.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sealstream ./sealstream
COPY schemas ./schemas
COPY ingest ./ingest
COPY encryptor ./encryptor
COPY indexer ./indexer
COPY reader ./reader
COPY admin ./admin
COPY delivery ./delivery

# A regular (non-editable) install, then a check that every schema file the migrations read
# (schemas/postgres/*.sql, schemas/cassandra/*.cql, schemas/opensearch/*.json) made it into the
# installed package: a missing one would only show when `sealstream migrate` runs. The check
# runs from / so that `schemas` is imported from site-packages, not from this source tree.
RUN pip install . \
    && cd / \
    && python -c "import pathlib, sys; from importlib.resources import files; \
src = pathlib.Path('/src/schemas'); inst = pathlib.Path(str(files('schemas'))); \
missing = sorted(str(p.relative_to(src)) for p in src.rglob('*') if p.is_file() \
and p.suffix not in ('.py', '.pyc') and not (inst / p.relative_to(src)).is_file()); \
sys.exit('schema files missing from the installed package (add them to ' \
'[tool.setuptools.package-data] in pyproject.toml): ' + ', '.join(missing) if missing else 0)" \
    && rm -rf /src

# Non-root. Its home is the working directory because the Faust workers (encryptor, indexer)
# keep a `<consumer group>-data/` folder in the directory they start in.
RUN useradd --create-home --uid 10001 --user-group sealstream
USER sealstream
WORKDIR /home/sealstream

EXPOSE 8443 8444 8445 8446
ENTRYPOINT ["sealstream"]
CMD ["--help"]
