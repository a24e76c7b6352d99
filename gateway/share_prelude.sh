# Runs inside a share's sandbox just before its command (gateway/sandbox.py): with `sh`, so a
# start costs a millisecond, not an interpreter.
#
# The user's own Python layer: a venv in their home on this server, chained to the environment
# the gateway offers, so that `pip install` and `%pip install` install for this user alone
# and last across their shares. Made on first use; `rm -r` it to start afresh.
env_dir=${BITFUSION_USER_ENV:-}
if [ -n "$env_dir" ] && [ ! -e "$env_dir/pyvenv.cfg" ]; then
    "$BITFUSION_OFFERED_PYTHON" -I "${0%/*}/user_env.py" "$env_dir" ||
        echo "bitfusion: could not make your Python environment in $env_dir;" \
            "packages you install here will not be kept." >&2
fi
# A program that is not there gets the sentence `bitfusion run` used to give, not sh's own.
if ! command -v -- "$1" >/dev/null 2>&1; then
    echo "bitfusion: cannot run '$1' in the share on ${BITFUSION_SERVER:-this server}:" \
        "no such program there (its commands run on the GPU server, in $PWD)." >&2
    exit 127
fi
exec "$@"
