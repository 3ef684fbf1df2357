"""Dataset preparation: source images to a training folder, captions, caption tools and the dataset report.

Everything here works on plain files and PIL images: no Gradio, no WebUI. The panel and the CLI call it.
Source folders are only ever read (DESIGN invariant 4); every file written goes through an atomic rename.
"""
