"""The gateway: runs on each GPU server and hands out shares of its GPUs."""
