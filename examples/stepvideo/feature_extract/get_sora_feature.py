"""Feature extraction under the path the user guide's launchers call.

Runs mindspeed_mm/tools/feature_extraction/get_sora_feature.py, with the same flags.
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[3]
    runpy.run_path(str(repo / "mindspeed_mm/tools/feature_extraction/get_sora_feature.py"), run_name="__main__")
