# ecgvlm on a Ray GPU node: the image cluster.yaml runs on every node.
#
#   docker build -t ecgvlm:0.1.0-gpu .
#   docker run --gpus all -p 8000:8000 ecgvlm:0.1.0-gpu \
#       ecgvlm serve --model-dir /models/PULSE-7B --host 0.0.0.0
#
# The base image is pinned to the Ray and Python versions of requirements.lock (ray==2.60.0,
# Python 3.11); tests/unit/test_deploy_files.py checks that the pins agree.
FROM rayproject/ray:2.60.0-py311-gpu

# The ray image runs as the non-root user `ray`; stay that user for everything we install.
USER ray
WORKDIR /home/ray/ecgvlm

# Locked versions first, in their own layer, so code edits do not reinstall the stack.
# DS_BUILD_OPS=0: DeepSpeed JIT-builds the ops it needs on first use instead of at install.
COPY --chown=ray:users requirements.lock ./
RUN DS_BUILD_OPS=0 pip install --no-cache-dir -r requirements.lock

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ecgvlm ./ecgvlm
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir --no-deps -e .

ENV DS_BUILD_OPS=0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

EXPOSE 8000 8265 6379
# The serve endpoint's liveness route; on a plain Ray node (no app) this reports unhealthy,
# which is the truth for a node meant to serve.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
