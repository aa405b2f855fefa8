#!/usr/bin/env bash
# A stand-in for `.venv/bin/python main.py ARGS` on a fake TPU worker (tests/helpers/fake_gcloud.py
# runs the workers; tests/test_tpu_pod_launch.py installs this as the checkout's .venv/bin/python).
#
# It says what it got, then runs until SIGTERM (then, like main.py after its checkpoint, exits
# 0), for FAKE_RUN_SECONDS at most (then exits 0: finished). The worker FAKE_FAIL_WORKER
# (NODE:WORKER) instead exits 1 after FAKE_FAIL_AFTER seconds. With XLA_FLAGS naming a
# --xla_dump_to folder, it writes a file there, as XLA would.
me="$FAKE_TPU_NODE:$FAKE_TPU_WORKER"
echo "fake main.py on $me: $*"
echo "fake main.py on $me: LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS-<unset>}"
echo "fake main.py on $me: XLA_FLAGS=${XLA_FLAGS-<unset>}"
if [[ "${XLA_FLAGS:-}" =~ --xla_dump_to=([^ ]+) ]]; then
  echo "HloModule fake" >"${BASH_REMATCH[1]}/module_0001.fake.before_optimizations.txt"
fi
trap 'echo "fake main.py on $me: SIGTERM: saved a checkpoint"; touch "$HOME/got_sigterm"; exit 0' TERM
seconds="${FAKE_RUN_SECONDS:-600}"
if [[ "$me" == "${FAKE_FAIL_WORKER:-}" ]]; then seconds="${FAKE_FAIL_AFTER:-3}"; fi
end=$((SECONDS + seconds))
while ((SECONDS < end)); do sleep 0.1; done
if [[ "$me" == "${FAKE_FAIL_WORKER:-}" ]]; then
  echo "fake main.py on $me: Stopped: something broke"
  exit 1
fi
echo "fake main.py on $me: finished"
