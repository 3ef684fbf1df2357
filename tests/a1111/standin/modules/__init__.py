"""Stand-in for the WebUI's `modules` package (see ../README.md). Test code: not shipped."""
