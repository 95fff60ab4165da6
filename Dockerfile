# The playground on a GPU host.
#
#   docker build -t llama-playground .
#   docker run --gpus all -p 7860:7860 llama-playground --auth me:secret     # the shipped model
#   docker run --gpus all -p 7860:7860 -v ~/llama-2-7b-chat:/weights:ro \
#       llama-playground --model /weights --auth me:secret                  # real weights
#
# The install repeats .ci/run's steps, so what CI tests is what this image runs: upgrade pip,
# then torch==2.13.0, then the requirements (.ci/run takes requirements-test.txt, which is
# requirements.txt plus the test tools). On Linux, PyPI's torch wheel is the CUDA build and
# carries its CUDA libraries, so the host needs only the NVIDIA driver and the NVIDIA Container
# Toolkit. CI's machine resolves the same pin to a local CPU wheel.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False

WORKDIR /app

COPY requirements.txt ./
RUN python -m pip install --quiet --upgrade pip \
 && python -m pip install --quiet torch==2.13.0 \
 && python -m pip install --quiet -r requirements.txt

COPY llama/ llama/
COPY ui/ ui/
COPY assets/ assets/
COPY app.py pyproject.toml ./

EXPOSE 7860
# 0.0.0.0 makes the app reachable from outside the container; app.py prints a warning when it
# listens there without --auth. Any other flag (--model, --load-in-8bit, --share ...) follows.
ENTRYPOINT ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
