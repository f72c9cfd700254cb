"""The openvino target unit: target.py is the build side, backend.py the device side (appended to the loader core in
each openvino bundle's loader.py, and used by the build-time runner, so what is validated is what ships)."""
