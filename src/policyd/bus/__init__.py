"""policyd's D-Bus layer: the only code that touches dbus-fast (dispatch, interfaces, objects,
authorization, polkit). Unprivileged; everything from the bus is untrusted until validated."""
