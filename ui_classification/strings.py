"""Every piece of text the viewer shows, English and Chinese, in one table.

    text = Text("zh")
    text("run")                       # "运行"
    text("seen", total=12, labelled=10, skipped=1)

Both languages must hold the same keys with the same {placeholders} (tests/test_ui.py checks).
"""

from __future__ import annotations

LANGUAGES = ("en", "zh")

TEXT: dict[str, dict[str, str]] = {
    "en": {
        # controls
        "choose_checkpoint": "Checkpoint…",
        "choose_images": "Image folder…",
        "choose_save": "Save folder…",
        "run": "Run",
        "stop": "Stop",
        "stopping": "Stopping…",
        "previous": "◀ Previous",
        "next": "Next ▶",
        "autoplay": "Autoplay",
        "interval_suffix": " s",
        "interval_tip": "Autoplay shows the next image after this many seconds",
        "pause": "Pause",
        "resume": "Resume",
        "record": "Record",
        "exit": "Exit",
        # path labels and panels
        "checkpoint_label": "Checkpoint: {path}",
        "images_label": "Images: {path}",
        "save_label": "Save to: {path}",
        "not_set": "(not set)",
        "no_image": "Choose a checkpoint and an image folder, then press Run.",
        "log_title": "Log",
        "metrics_title": "Metrics",
        "current_title": "Current image",
        "window_title": "{model}: {count} classes ({classes})",
        "window_title_loading": "Image classification viewer",
        # the current image
        "position": "[{index} / {total}] {path}",
        "prediction": "Prediction: {name} ({probability})",
        "true_class": "True class: {name}",
        "no_true_class": "True class: unknown (folder name is not a class)",
        "correct": "✓ correct",
        "incorrect": "✗ incorrect",
        "topk": "Top {k}:",
        # drawn on the image
        "overlay_prediction": "{name} {probability}",
        "overlay_truth": "true: {name} {mark}",
        # metrics panel
        "seen": "Images classified: {total}\n  with a true class: {labelled}\n  unreadable: {skipped}",
        "accuracy": "Accuracy: {value}",
        "precision": "Precision (macro): {value}",
        "recall": "Recall (macro): {value}",
        "f1": "F1 (macro): {value}",
        "speed": "Speed: {value:.1f} images/s",
        "no_labels": "No image has a true class yet (its folder name must be one of the checkpoint's classes).",
        "column_class": "class",
        "column_true": "true",
        "column_predicted": "predicted",
        "column_correct": "correct",
        # log lines
        "log_loading": "Loading {path} on {device}…",
        "log_loaded": "Loaded {summary} on {device}",
        "log_run_started": "Run: {count} images in {folder}",
        "log_saving": "Annotated images go to {folder}",
        "log_skipped": "Skipped unreadable image: {reason}",
        "log_not_saved": "Could not save the annotated image {path}",
        "log_run_finished": "Finished: {count} images in {seconds:.1f} s; {metrics}",
        "log_run_stopped": "Stopped after {count} images",
        "log_shown": "{position}: {name} {probability}",
        "log_recorded": "Recorded {files}",
        "log_autoplay_end": "Autoplay reached the last image",
        "log_error": "Error: {message}",
        # message boxes
        "title_error": "Error",
        "title_confirm": "Confirm",
        "confirm_close": "A run is still active. Stop it and close the window?",
        "err_bad_checkpoint": "Cannot load the checkpoint: {message}",
        "err_no_checkpoint": "Choose a checkpoint first.",
        "err_loading": "The checkpoint is still loading; press Run again in a moment.",
        "err_no_folder": "Choose an image folder first.",
        "err_missing_folder": "The image folder {path} does not exist.",
        "err_no_images": "No images in {path} (looked for {extensions}, sub-folders included).",
        "err_missing_save": "The save folder {path} does not exist; create it or choose another.",
        "err_nothing_to_record": "Nothing to record yet: press Run first.",
        "err_record_failed": "Could not write to {path}: {message}",
        "err_run_failed": "The run stopped on an error: {message}",
        "err_unexpected": "Unexpected error (the window stays open): {message}",
        # dialogs
        "dialog_checkpoint": "Choose a checkpoint",
        "dialog_checkpoint_filter": "Checkpoints (*.pth *.pt);;All files (*)",
        "dialog_images": "Choose an image folder",
        "dialog_save": "Choose a folder for annotated images and records",
        "dialog_record": "Choose a folder for predictions.csv and the log",
    },
    "zh": {
        "choose_checkpoint": "选择模型…",
        "choose_images": "选择图片文件夹…",
        "choose_save": "选择保存文件夹…",
        "run": "运行",
        "stop": "停止",
        "stopping": "正在停止…",
        "previous": "◀ 上一张",
        "next": "下一张 ▶",
        "autoplay": "自动播放",
        "interval_suffix": " 秒",
        "interval_tip": "自动播放时每隔这么多秒显示下一张",
        "pause": "暂停",
        "resume": "继续",
        "record": "记录",
        "exit": "退出",
        "checkpoint_label": "模型：{path}",
        "images_label": "图片：{path}",
        "save_label": "保存到：{path}",
        "not_set": "（未设置）",
        "no_image": "请选择模型和图片文件夹，然后点击“运行”。",
        "log_title": "日志",
        "metrics_title": "指标",
        "current_title": "当前图片",
        "window_title": "{model}：{count} 类（{classes}）",
        "window_title_loading": "图像分类查看器",
        "position": "[{index} / {total}] {path}",
        "prediction": "预测：{name}（{probability}）",
        "true_class": "真实类别：{name}",
        "no_true_class": "真实类别：未知（文件夹名不是类别名）",
        "correct": "✓ 正确",
        "incorrect": "✗ 错误",
        "topk": "前 {k} 个：",
        "overlay_prediction": "{name} {probability}",
        "overlay_truth": "真实：{name} {mark}",
        "seen": "已分类图片：{total}\n  有真实类别：{labelled}\n  无法读取：{skipped}",
        "accuracy": "准确率：{value}",
        "precision": "精确率（宏平均）：{value}",
        "recall": "召回率（宏平均）：{value}",
        "f1": "F1（宏平均）：{value}",
        "speed": "速度：{value:.1f} 张/秒",
        "no_labels": "还没有带真实类别的图片（图片所在文件夹名须是模型的类别名）。",
        "column_class": "类别",
        "column_true": "真实",
        "column_predicted": "预测",
        "column_correct": "正确",
        "log_loading": "正在加载 {path}（{device}）…",
        "log_loaded": "已加载 {summary}（{device}）",
        "log_run_started": "运行：{folder} 中的 {count} 张图片",
        "log_saving": "标注后的图片保存到 {folder}",
        "log_skipped": "跳过无法读取的图片：{reason}",
        "log_not_saved": "无法保存标注图片 {path}",
        "log_run_finished": "完成：{count} 张图片，用时 {seconds:.1f} 秒；{metrics}",
        "log_run_stopped": "已在 {count} 张图片后停止",
        "log_shown": "{position}：{name} {probability}",
        "log_recorded": "已记录 {files}",
        "log_autoplay_end": "自动播放已到最后一张",
        "log_error": "错误：{message}",
        "title_error": "错误",
        "title_confirm": "确认",
        "confirm_close": "仍在运行。停止运行并关闭窗口吗？",
        "err_bad_checkpoint": "无法加载模型：{message}",
        "err_no_checkpoint": "请先选择模型。",
        "err_loading": "模型仍在加载，请稍后再点击“运行”。",
        "err_no_folder": "请先选择图片文件夹。",
        "err_missing_folder": "图片文件夹 {path} 不存在。",
        "err_no_images": "{path} 中没有图片（查找 {extensions}，包括子文件夹）。",
        "err_missing_save": "保存文件夹 {path} 不存在；请创建它或另选一个。",
        "err_nothing_to_record": "还没有可记录的结果：请先点击“运行”。",
        "err_record_failed": "无法写入 {path}：{message}",
        "err_run_failed": "运行因错误而停止：{message}",
        "err_unexpected": "意外错误（窗口保持打开）：{message}",
        "dialog_checkpoint": "选择模型文件",
        "dialog_checkpoint_filter": "模型文件 (*.pth *.pt);;所有文件 (*)",
        "dialog_images": "选择图片文件夹",
        "dialog_save": "选择保存标注图片和记录的文件夹",
        "dialog_record": "选择保存 predictions.csv 和日志的文件夹",
    },
}


class Text:
    """Looks up and fills the strings of one language."""

    def __init__(self, lang: str = "en"):
        if lang not in TEXT:
            raise ValueError(f"unknown language {lang!r}; choose one of {', '.join(LANGUAGES)}")
        self.lang = lang
        self.table = TEXT[lang]

    def __call__(self, key: str, **values: object) -> str:
        return self.table[key].format(**values)
