"""``python nested_user.py UID GID -- COMMAND...``: run COMMAND as UID:GID, with no capability,
in a user namespace nested in the current one (where this runs as root, having just mounted
the client's folder: gateway/files_prelude.sh).

The nested namespace maps UID and GID to this namespace's root, so files keep their owner,
and its command holds no capability anywhere: it cannot unmount or remount what the share
was given. util-linux's ``unshare --map-user`` cannot write the map from inside a bubblewrap
sandbox (EPERM); writing it directly, as here, is what user_namespaces(7) allows.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def main(argv: list[str]) -> int:
    uid, gid, dash, *command = argv
    if dash != "--" or not command:
        print("nested_user: usage: UID GID -- COMMAND...", file=sys.stderr)
        return 125
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER) != 0:
        why = os.strerror(ctypes.get_errno())
        print(f"bitfusion: cannot start the command: {why}.", file=sys.stderr)
        return 125
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{int(uid)} 0 1\n")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{int(gid)} 0 1\n")
    # No capability can come back: not through the bounding set, nor the ambient one. The
    # exec as a non-root user clears what is left.
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    os.execvp(command[0], command)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
