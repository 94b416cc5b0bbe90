#!/bin/sh
# Runs once, on an empty data volume: Prefect's database is POSTGRES_DB; add MLflow's.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${MLFLOW_DB}\" OWNER \"${POSTGRES_USER}\";"
