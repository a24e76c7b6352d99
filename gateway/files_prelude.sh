# Runs first in a share's sandbox when the client's folder comes with the command
# (gateway/sandbox.py): mounts it at the client's own path with sshfs, then runs the rest.
#
#   files_prelude.sh PATH SFTP_IN SFTP_OUT UID GID PYTHON -- COMMAND...
#
# sshfs speaks SFTP over its stdin and stdout (`-o passive`), here the file descriptors the
# supervisor passed in, to the client's sftp-server, which serves only that folder. Mounting
# takes CAP_SYS_ADMIN as root of the sandbox's user namespace, so the sandbox starts that way;
# the command then runs in a user namespace nested in it, as UID:GID (the gateway's user, as
# in every sandbox), with no capability left: it cannot unmount or remount the folder.
path=$1 sftp_in=$2 sftp_out=$3 uid=$4 gid=$5 python=$6
shift 7
# uid=0,gid=0: the files are the user's in the nested namespace. A new file on the client
# shows within a second (dcache_timeout), not sshfs's default 20.
eval "sshfs -f -o passive,uid=0,gid=0,dcache_timeout=1 \":\$path\" \"\$path\" \
    <&$sftp_in >&$sftp_out $sftp_in<&- $sftp_out>&- &"
eval "exec $sftp_in<&- $sftp_out>&-"
tries=0
until mountpoint -q "$path"; do
    tries=$((tries + 1))
    if [ "$tries" -gt 200 ] || ! kill -0 $! 2>/dev/null; then
        echo "bitfusion: could not mount your folder $path in the share; the command did" \
            "not start." >&2
        exit 125
    fi
    sleep 0.05
done
cd "$path" || exit 125  # the mount, not the folder it covers
exec "$python" -I -S "${0%/*}/nested_user.py" "$uid" "$gid" -- "$@"
