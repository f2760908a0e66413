"""Tools around the router: `kubetoll demo`, `kubetoll estimate` and `kubetoll report`."""
