"""
MVBench (OpenGVLab/MVBench as downloaded): json/<task>.json and video/<folder of the task>/.

    python bench.py --task=mvbench --data_dir=MVBench
"""
import glob
import os

from tasks.common import mcq_record, media_finder, read_rows

# task json -> folder under video/, as in the official MVBench evaluation (Ask-Anything)
MVBENCH_VIDEO = {
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos", "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}


# the tasks whose start/end the official evaluation applies
MVBENCH_BOUNDED = {"action_sequence", "action_prediction", "object_interaction",
                   "action_localization", "episodic_reasoning"}


def read(data_dir):
    """MVBench: json/<task>.json (rows {video, question, candidates, answer (option text), start?,
    end?}) and video/<MVBENCH_VIDEO[task]>/<video> (a file or frame folder). Category = the task."""
    json_dir = os.path.join(data_dir, "json")
    json_dir = json_dir if os.path.isdir(json_dir) else data_dir
    files = sorted(glob.glob(os.path.join(json_dir, "*.json")))
    if not files:
        raise FileNotFoundError(f"tasks/mvbench.py: no MVBench json/*.json under {data_dir}; "
                                f"point data_dir at the download")
    locate, records = media_finder(data_dir), []
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.join(data_dir, "video", MVBENCH_VIDEO.get(name, ""))
        for j, row in enumerate(read_rows(path)):
            rec = dict(mcq_record(row, f"{path}[{j}]", name), id=f"{name}/{j}")
            if name in MVBENCH_BOUNDED or name not in MVBENCH_VIDEO:
                rec.update({k: float(row[k]) for k in ("start", "end") if row.get(k) is not None})
            video = os.path.join(folder, row["video"])
            records.append(locate(rec, "video", video, row["video"]))
    return records

