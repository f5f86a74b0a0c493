# The voice bot as an image: `docker build -t voicebot .`; compose.yaml runs it with PostgreSQL.
# tests/test_packaging.py repeats these steps (the same files, a non-editable install, a start
# from outside the sources) on every CI run, since no container engine runs there.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Installed from a copy of the sources, which is then dropped: the image runs from site-packages.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY twiml ./twiml
RUN pip install ".[postgres]" && rm -rf /src

RUN useradd --create-home --home-dir /app --uid 10001 voicebot
WORKDIR /app
USER voicebot

# PORT and every other setting come from the environment (see the README); with DATABASE_URL
# unset, the outbox is a SQLite file: mount a volume on /app/data to keep it across restarts.
ENV PORT=5052 \
    DATABASE_PATH=/app/data/voicebot.sqlite3
EXPOSE 5052
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '5052'), timeout=2)"
CMD ["python", "-m", "bot", "serve"]
