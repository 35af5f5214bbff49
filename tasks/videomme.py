"""
Video-MME (lmms-lab/Video-MME as downloaded): tables of questions and data/<videoID>.mp4.

    python bench.py --task=videomme --data_dir=Video-MME --videomme_duration=short
"""
import os

from tasks.common import mcq_record, media_finder, table_files


def read(data_dir, duration=""):
    """Video-MME, one `duration` or all (''): tables of rows {videoID, question, options ["A. ..",
    ...], answer (letter), duration, domain, task_type}; videos data/<videoID>.mp4. Category =
    duration."""
    locate, records = media_finder(data_dir), []
    if duration not in ("", "short", "medium", "long"):
        raise ValueError(f"tasks/videomme.py: videomme_duration={duration!r}: "
                         f"choose short, medium, long or '' (all)")
    need = ["videoID|videoid|video_id", "question", "options", "answer"]
    for path, rows in table_files(data_dir, need):
        for j, row in enumerate(rows):
            if duration and row.get("duration") != duration:
                continue
            vid = str(row.get("videoID") or row.get("videoid") or row.get("video_id"))
            rec = dict(mcq_record(row, f"{path}[{j}]", row.get("duration", "all")),
                       id=row.get("question_id", f"{vid}/{j}"), domain=row.get("domain"),
                       task_type=row.get("task_type"))
            video = os.path.join(data_dir, "data", vid + ".mp4")
            records.append(locate(rec, "video", video, vid + ".mp4"))
    return records

