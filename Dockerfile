# The drplan runtime image: the flows, their dependencies (requirements.lock, hashes checked) and prefect-kubernetes.
# The same image runs the Kubernetes worker (the default command) and every flow run's Job (the worker sets its
# args to `prefect flow-run execute`). Deploy from inside it, so that the working directory `prefect deploy`
# records (prefect.yaml has no pull section) is /opt/drplan. Guide: docs/kubernetes.md.
#
#   docker build -t drplan:$(git describe --always) .
FROM python:3.11-slim-bookworm

ARG UV_VERSION=0.13.9
ENV PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    GX_ANALYTICS_ENABLED=false

# setpriv (util-linux) starts PostgreSQL and barman-cloud as the unprivileged drill.os_user; PostgreSQL's
# initdb refuses root. The user is also created at run time when missing (drplan/pgserver.ensure_os_user).
RUN apt-get update \
 && apt-get install -y --no-install-recommends util-linux ca-certificates libpq5 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/tmp/drplan-drills --shell /usr/sbin/nologin drplan-pg

WORKDIR /opt/drplan
COPY requirements.lock pyproject.toml ./
# The venv outside /root: barman-cloud runs from archive_command as drplan-pg, which must execute its interpreter.
RUN python -m venv $VIRTUAL_ENV \
 && pip install --no-cache-dir "uv==$UV_VERSION" \
 && uv pip sync --no-cache --python $VIRTUAL_ENV/bin/python --require-hashes --compile-bytecode requirements.lock
COPY . .
RUN uv pip install --no-cache --python $VIRTUAL_ENV/bin/python --no-deps . \
 && drplan --help > /dev/null \
 && python -c "import prefect_kubernetes, flows.restore_drill, flows.fleet_drill"

# Root, so that drplan can switch to drill.os_user for PostgreSQL (setpriv); the Job template in prefect.yaml
# forbids privilege escalation. Flow runs need no other privilege.
CMD ["prefect", "worker", "start", "--pool", "drplan", "--type", "kubernetes"]
