"""An AT-SPI driver for the desktop tests: reads the accessibility tree of the apps on one
session bus and presses buttons in it, as a screen reader or a person's click would.

Test harness, runs as root under Debian's system Python (pyatspi is python3-pyatspi; the
project's venv has no gi). One JSON command a line on stdin, one JSON answer a line on stdout:
  {"op": "wait", "role": "list item", "name": "regex", "present": true, "timeout": 20}
      -> {"ok": true, "names": [...]}  (names of the matching nodes; waits for some, or none)
  {"op": "press", "row": "regex", "button": "Approve", "timeout": 20}
      -> {"ok": true}  (the named button inside the first node whose name matches `row`)
  {"op": "window"} -> {"ok": true, "extents": [x, y, width, height]}
Waiting reads the tree again every 50 ms (a test's bounded wait, not the app's behaviour).
"""

import json
import re
import sys
import time

import pyatspi

POLL_S = 0.05


def nodes(root):
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        try:
            stack.extend(reversed([node.getChildAtIndex(i) for i in range(node.childCount)]))
        except Exception:  # a node that went away while walking: skip it
            continue


def matching(role, name):
    pattern = re.compile(name)
    found = []
    for node in nodes(pyatspi.Registry.getDesktop(0)):
        try:
            if (role is None or node.getRoleName() == role) and pattern.search(node.name or ""):
                found.append(node)
        except Exception:
            continue
    return found


def until(probe, timeout):
    """probe() until it returns something; a node that goes away while it is being read (the
    tree changes under the walk: "The application no longer exists") is another try."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except Exception:
            value = None
        if value is not None:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


def wait(cmd):
    present = cmd.get("present", True)

    def probe():
        names = [n.name for n in matching(cmd.get("role"), cmd["name"])]
        return names if bool(names) == present else None

    names = until(probe, cmd.get("timeout", 20))
    if names is None:
        return {"ok": False, "error": f"timed out: {cmd}", "tree": dump()}
    return {"ok": True, "names": names}


def press(cmd):
    def probe():
        for row in matching(None, cmd["row"]):
            for node in nodes(row):
                if node.getRoleName() == "push button" and node.name == cmd["button"]:
                    return node
        return None

    button = until(probe, cmd.get("timeout", 20))
    if button is None:
        return {"ok": False, "error": f"no button: {cmd}", "tree": dump()}
    action = button.queryAction()
    names = [action.getName(i) for i in range(action.nActions)]
    action.doAction(names.index("click") if "click" in names else 0)
    return {"ok": True}


def window(_cmd):
    frames = matching("frame", ".")
    if not frames:
        return {"ok": False, "error": "no window", "tree": dump()}
    ext = frames[0].queryComponent().getExtents(pyatspi.DESKTOP_COORDS)
    return {"ok": True, "extents": [ext.x, ext.y, ext.width, ext.height]}


def dump():
    lines = []
    for node in nodes(pyatspi.Registry.getDesktop(0)):
        try:
            lines.append(f"{node.getRoleName()}: {node.name!r}")
        except Exception:
            continue
    return lines


def main():
    ops = {"wait": wait, "press": press, "window": window}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            answer = ops[cmd["op"]](cmd)
        except Exception as e:
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
