"""Baseline for bench_dashboard.py: a page that only draws the uploaded image with plotly.

Its time from upload to drawn image is mostly plotly's first load in a fresh page; the dashboard's
upload-to-overlay time is reported as a ratio to it. Its opacity slider (a rerun of this tiny page
that redraws the one figure) is the floor for the dashboard's re-render times.
"""

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

st.set_page_config(page_title="baseline: image only", layout="wide")
upload = st.file_uploader("Upload an image", type=["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"],
                          key="upload")
if upload is not None:
    image = np.asarray(Image.open(upload).convert("RGB"))
    st.caption(f"{upload.name} · {image.shape[1]}×{image.shape[0]} px")
    opacity = st.slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="opacity")
    st.plotly_chart(go.Figure(go.Image(z=image, opacity=opacity)), key="image")
