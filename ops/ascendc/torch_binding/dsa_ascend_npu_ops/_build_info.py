# Written by ops/ascendc/build.sh: where the custom-op package was installed
# (<install path>/vendors/dsa_ascend). Empty in the source tree.
VENDOR_DIR = ""
