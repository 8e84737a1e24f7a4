# bertqa endpoint image for Amazon SageMaker (bring your own container), CPU.
#
#   docker build -t bertqa .
#   docker run -p 8080:8080 -v $PWD/out/squad:/opt/ml/model bertqa serve       # what SageMaker runs
#   curl localhost:8080/ping
#
# SageMaker unpacks the model's model.tar.gz (`bertqa package`) into /opt/ml/model and starts the container
# with the argument "serve"; the server then answers GET /ping and POST /invocations on $SAGEMAKER_BIND_TO_PORT
# (8080), and stops cleanly on SIGTERM. See bertqa/serve.py for the environment variables it honours.
#
# NOTE: not built or run on the development machine, which has no Docker engine. It is kept minimal and follows
# the documented SageMaker contract; build and smoke-test it (the three commands above) before deploying.
FROM python:3.11-slim

# gcc builds the C core (bertqa._C); libgomp1 is its OpenMP runtime at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/bertqa
COPY pyproject.toml setup.py README.md ./
COPY csrc ./csrc
COPY bertqa ./bertqa
# No cuda/ folder: this is the CPU image (setup.py then builds bertqa._C only; uvicorn and starlette come as
# dependencies of the package).
RUN pip install --no-cache-dir . \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y

ENV PYTHONUNBUFFERED=1
EXPOSE 8080
# `docker run IMAGE serve` -> `python -m bertqa serve` (default --model-dir /opt/ml/model: a folder or an archive)
ENTRYPOINT ["python3", "-m", "bertqa"]
CMD ["serve"]
