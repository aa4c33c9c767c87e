# Ordermill: one image for every worker and for the operator's tool.
#   docker build -t ordermill .
#   docker run --rm ordermill --help
# docker-compose.yml runs it as `ordermill migrate`, `ordermill run placement`, ...
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# The runtime dependencies first, read from pyproject.toml alone, so that a change to
# the code does not reinstall them. The test extra is not installed.
COPY pyproject.toml ./
RUN python -c "import subprocess, sys, tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])"

# Then the packages themselves (setuptools needs them present to build).
COPY shared ./shared
COPY services ./services
COPY cli ./cli
COPY sandbox ./sandbox
COPY console ./console
RUN pip install --no-deps . && pip check && rm -rf build *.egg-info

RUN groupadd --system --gid 10001 ordermill \
 && useradd --system --uid 10001 --gid ordermill --create-home --shell /usr/sbin/nologin ordermill

# The sample catalog, for `ordermill catalog load catalog.example.toml`.
WORKDIR /app
COPY catalog.example.toml ./

USER 10001:10001
ENTRYPOINT ["ordermill"]
CMD ["--help"]
