// ti_trainer: tooltips for every option in words an artist uses, and the live view of a training run.
//
// The WebUI (A1111 or Forge) loads this file like every extension's javascript/; the standalone app runs it
// through Gradio's load-time `_js` (`js` in Gradio 4). It needs nothing from the WebUI, and uses the WebUI's
// helpers (gradioApp, onUiUpdate, randomId, requestProgress) when they are there. Its selectors find the
// same markup in Gradio 3.41 and 4.40 (tests/ui/test_browser.py runs under both).
(function () {
    "use strict";

    // Element id (elem_id in the panels) -> the tooltip. Keep the words plain: these answer the questions the
    // tutorials show people stuck on (batch vs accumulation, vectors per token, learning rate, latents).
    const TITLES = {
        // Create embedding
        ti_trainer_create_name:
            "The word you will type in prompts to use this embedding, e.g. my-style. Pick a made-up word the model " +
            "does not already know (not 'MonaLisa'). It is also the file name.",
        ti_trainer_create_init_text:
            "A few words describing what you want to teach, e.g. 'oil painting, richly textured'. The embedding starts " +
            "from their meaning, which points training in the right direction. '*' starts from nothing in " +
            "particular; leave it empty to start from zero.",
        ti_trainer_create_vectors:
            "How many word-slots the embedding gets. More slots can hold a richer style but copy it more rigidly, " +
            "and each one uses up a token of your prompt (a prompt chunk holds 75). 1 to 8 is a good start; " +
            "complex styles may want more.",
        ti_trainer_create_overwrite:
            "Replace an embedding of the same name with a fresh, untrained one. Copies saved in the log folder stay.",
        ti_trainer_create_button: "Write the new, untrained embedding into the embeddings folder. Then train it on the Train tab.",

        // Train: what and how fast
        ti_trainer_train_embedding_name:
            "The embedding to train. It goes on from the step it has reached (shown below), so you can stop and " +
            "carry on later.",
        ti_trainer_train_refresh: "Reload the lists of embeddings and prompt templates.",
        ti_trainer_train_refresh_templates: "Reload the lists of embeddings and prompt templates.",
        ti_trainer_train_learn_rate:
            "How big a change each step makes. Too high and results 'overbake' (harsh, burnt-looking); too low and " +
            "it takes forever. 0.005 is the usual start. A schedule such as '0.005:200, 0.001:1000, 0.0005' " +
            "lowers it at steps 200 and 1000.",
        ti_trainer_train_clip_grad_mode:
            "Caps how big a single step's change can be, so one odd batch cannot throw training off. 'disabled' is " +
            "fine for most runs; 'norm' is the gentler cap.",
        ti_trainer_train_clip_grad_value: "The cap used by gradient clipping: a number, or a schedule like the learning rate.",
        ti_trainer_train_batch_size:
            "How many images the graphics card works on at the same moment. Bigger is faster but needs more video " +
            "memory: if you get an out-of-memory error, lower it. What one step learns from is batch size × " +
            "accumulation, not batch size alone.",
        ti_trainer_train_gradient_accumulation:
            "How many batches are added up before the embedding changes once. Batch size × accumulation = the " +
            "images each step learns from. The planner below suggests choices that use every image once per epoch.",
        ti_trainer_train_data_dir:
            "The folder with your training images, each with a .txt file of the same name holding its caption. " +
            "Images in sub-folders are not used.",

        // The planner
        ti_trainer_plan:
            "How your batch size and accumulation split the dataset: images per step, steps per epoch (one pass " +
            "over all images), and whether your save intervals land on whole epochs.",
        ti_trainer_plan_max_batch:
            "The biggest batch size your graphics card manages at this image size (an out-of-memory error means " +
            "too big). The suggested splits never go above it.",
        ti_trainer_plan_align:
            "Round Max steps and both 'every N steps' numbers to whole epochs, so every saved copy and preview " +
            "comes after the same images.",
        ti_trainer_plan_splits: "Batch size × accumulation choices that divide your dataset evenly. Click one to use it.",

        // Where, which prompts, what size
        ti_trainer_train_log_dir:
            "Where each run keeps its saved copies, preview images, loss log and settings: " +
            "<log directory>/<date>/<embedding name>/.",
        ti_trainer_train_template:
            "The prompts used while training: [name] becomes your embedding, [filewords] an image's caption. " +
            "style_filewords.txt suits styles, subject_filewords.txt objects and characters; " +
            "filewords_name.txt is the simple '[filewords], [name]'.",
        ti_trainer_train_width:
            "The width images are resized and cropped to for training. Use your model's size: 768 for SD 2.x 768 " +
            "models, 512 for 512 models. Bigger needs more video memory.",
        ti_trainer_train_height:
            "The height images are resized and cropped to for training. Use your model's size: 768 for SD 2.x 768 " +
            "models, 512 for 512 models. Bigger needs more video memory.",
        ti_trainer_train_keep_size:
            "Train every image at its own size instead of resizing it. Images of different sizes never share a batch.",
        ti_trainer_train_aspect_buckets:
            "Fit each image to the nearest of a few shapes around Width × Height instead of squashing it to one " +
            "shape, so portrait and landscape images keep their proportions.",
        ti_trainer_train_max_steps:
            "Training stops at this step. You can stop sooner with Interrupt and resume later; the copies saved " +
            "on the way let you pick the best step afterwards.",
        ti_trainer_train_preview_every:
            "Draw a preview picture every N steps so you can watch the style develop. 0: no previews (faster).",
        ti_trainer_train_save_every:
            "Keep a copy of the embedding every N steps in the log folder (name-500.pt and so on). Try several " +
            "later to find the step just before it overbakes.",

        // How prompts and images are used
        ti_trainer_train_use_alpha_weight:
            "For PNGs with transparency: transparent parts count less, so a subject on a cut-out background is " +
            "learned without the background.",
        ti_trainer_train_save_image_with_embedding:
            "Also save each preview as a PNG that carries the embedding inside it; the WebUI can load the " +
            "embedding straight from the picture.",
        ti_trainer_train_save_format:
            "The file the embedding and its saved steps are written as. pt is the WebUI's own format; " +
            "safetensors holds only the numbers. The WebUI, Forge, diffusers and ComfyUI load both.",
        ti_trainer_train_shuffle_tags:
            "Shuffle the comma-separated words of each caption every time it is used, so the embedding does not " +
            "learn their order.",
        ti_trainer_train_tag_dropout:
            "The chance that each caption word is left out of a prompt. A little (0.1) keeps the embedding from " +
            "depending on your exact captions.",
        ti_trainer_train_latent_sampling:
            "How each image is turned into the model's compressed form. 'once': one random version, reused. " +
            "'deterministic': the exact middle version, no randomness (what the tutorials recommend: as good and " +
            "quicker). 'random': a new random version every time, as in the original paper.",

        // Previews
        ti_trainer_train_previews: "What the preview pictures are drawn with.",
        ti_trainer_train_preview_prompt:
            "The prompt for previews: write your embedding's name in it. Empty: a training prompt built from a " +
            "caption of the current batch.",
        ti_trainer_train_preview_negative_prompt: "What previews should avoid, as in txt2img.",
        ti_trainer_train_preview_sampler: "The sampler that draws previews. In the WebUI you can type any of its sampler names.",
        ti_trainer_train_preview_steps: "Sampling steps per preview. More is slower.",
        ti_trainer_train_preview_cfg_scale: "How closely previews follow the prompt; 7 is usual.",
        ti_trainer_train_preview_seed:
            "The seed for previews. Keeping it fixed makes previews of different steps comparable: only the " +
            "embedding changes between them.",
        ti_trainer_train_preview_width: "Preview width; 0 uses the training width.",
        ti_trainer_train_preview_height: "Preview height; 0 uses the training height.",

        // Memory, stopping, logging
        ti_trainer_train_memory: "Settings that trade speed against video memory.",
        ti_trainer_train_precision:
            "The number format used while training. 'auto' picks bf16 on cards that have it, fp16 on older ones " +
            "and full precision (fp32) on a CPU. Choose fp32 if the loss turns into NaN.",
        ti_trainer_train_attention:
            "How the model's attention is computed. 'auto' picks the fastest memory-saving kind this machine has " +
            "(PyTorch's SDPA, or xformers when installed). 'math' is the plain, memory-hungry kind the WebUI's own " +
            "trainer uses.",
        ti_trainer_train_upcast_attention:
            "Compute attention scores in full precision. SD 2.1 768 models need it in half precision, where the " +
            "loss otherwise turns into NaN. 'auto' decides from the model and the precision.",
        ti_trainer_train_gradient_checkpointing:
            "Saves video memory by recomputing parts of the model instead of keeping them, at about half again " +
            "the time per step. 'auto': off, and switched on only if the batch would not fit. 'high-res': only " +
            "the largest layers. 'all': least memory, slowest.",
        ti_trainer_train_vae_offload:
            "Move the image encoder (VAE) out of video memory while training. It is only needed at the start " +
            "(every image is encoded once) and for previews.",
        ti_trainer_train_lend_text_encoders:
            "SDXL only. Keep its two text encoders in normal memory and bring each into video memory only for " +
            "the moment it is used. Frees about 1.5 GB, which lets SDXL train 2 images at a time at 1024 px on an " +
            "8 GB card, for a little time each step. 'auto': only if the batch would not fit otherwise, before " +
            "switching on more checkpointing.",
        ti_trainer_train_stopping: "Let training stop by itself once it stops improving.",
        ti_trainer_train_validate_every:
            "Every N steps, measure the loss on the same images with the same noise. Unlike the training loss, " +
            "it can be compared from step to step and shows when learning levels off. 0: off.",
        ti_trainer_train_early_stopping:
            "Stop by itself once the validation loss has levelled off. Every copy saved so far stays, and you " +
            "can resume.",
        ti_trainer_train_early_stop_window: "How many steps of validation loss are looked at to decide it has levelled off.",
        ti_trainer_train_early_stop_threshold:
            "How flat counts as levelled off: the wobble of the last window compared with the whole run's. " +
            "Lower waits longer.",
        ti_trainer_train_more: "Captions from file names, the loss log, resuming and repeatability.",
        ti_trainer_train_filename_regex:
            "For images without a .txt caption: the caption is made from the file name, keeping the words this " +
            "regular expression finds.",
        ti_trainer_train_filename_join: "What goes between those words.",
        ti_trainer_train_write_csv_every: "Write the loss to textual_inversion_loss.csv in the log folder every N steps.",
        ti_trainer_train_save_optimizer_state:
            "Also save the optimizer's state beside each copy (.optim file), so a resumed run continues exactly " +
            "where it stopped.",
        ti_trainer_train_seed:
            "Makes a run repeatable: the same settings and seed give the same embedding. -1 picks one and writes " +
            "it into the run's settings file.",
        ti_trainer_train_weight_decay: "Gently pulls the vectors towards zero every step. 0 (the WebUI's value) turns it off.",

        // Buttons and results
        ti_trainer_train_fill:
            "Fill this form with the settings of the last run of the selected embedding (read from its settings " +
            "file in the log folder).",
        ti_trainer_train_interrupt: "Stop after the current step. The embedding is saved; training it again resumes from there.",
        ti_trainer_train_button: "Start training the selected embedding on the dataset folder.",
        ti_trainer_progress: "Where the run is, how fast it goes, and when it should be done.",
        ti_trainer_loss_plot:
            "The training loss jumps from step to step (every step draws new noise): read its trend. The " +
            "validation loss is measured the same way each time, so it is the one that shows progress.",
        ti_trainer_previews: "Preview pictures, newest first.",
        ti_trainer_last_saved: "The most recent copy of the embedding; click to download it.",
        ti_trainer_results_refresh: "Read the runs under the log directory again, and the chosen run's files.",
    };

    // Sub-tab buttons have no id of their own: matched by their text inside our tab bar.
    const TAB_TITLES = {
        "Create embedding": "Make a new, untrained embedding.",
        Train: "Train an embedding on a folder of images.",
        Prepare: "Crop, resize and caption your images before training.",
        Results: "Compare the saved copies and pick the best step.",
    };

    const ACTIVE_STATES = ["preparing", "training", "stopping"];
    const POLL_MS = 1000;
    const WAIT_FOR_START_MS = 15000; // a queued job may take a moment to begin

    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        const app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    function setTitle(element, text) {
        if (element && element.title !== text) element.title = text;
    }

    function applyTitles() {
        const app = root();
        for (const [id, text] of Object.entries(TITLES)) {
            const element = app.querySelector("#" + id);
            if (!element) continue;
            // An accordion's tooltip belongs on its header, not on everything inside it.
            const header = element.querySelector(":scope > .label-wrap");
            if (header) {
                setTitle(header, text);
                continue;
            }
            setTitle(element, text);
            // Labels too: the WebUI gives spans that read "Batch size", "Seed"... its txt2img tooltips.
            element.querySelectorAll("span[data-testid='block-info'], label > span").forEach((label) => setTitle(label, text));
        }
        app.querySelectorAll("#ti_trainer_tabs > .tab-nav > button").forEach((button) => {
            const text = TAB_TITLES[button.textContent.trim()];
            if (text) setTitle(button, text);
        });
    }

    // ---- the live view: click the hidden Poll button while a run is on -------------------------------------

    let timer = null;
    let waitUntil = 0;

    function runState() {
        const box = root().querySelector("#ti_trainer_progress .ti-trainer-progress");
        return box ? box.dataset.state : "idle";
    }

    function tick() {
        const active = ACTIVE_STATES.includes(runState());
        if (!active && Date.now() > waitUntil) {
            clearInterval(timer);
            timer = null;
            return;
        }
        const button = root().querySelector("#ti_trainer_poll");
        if (button) button.click();
    }

    function followRun(waitMs) {
        waitUntil = Math.max(waitUntil, Date.now() + waitMs);
        if (!timer) timer = setInterval(tick, POLL_MS);
    }

    // The Train button's `_js`: give the job an id (the WebUI's progress bar follows it), start following.
    function startTraining(...args) {
        const id = typeof randomId === "function" ? randomId() : "task(" + Math.random().toString(36).slice(2) + ")";
        args[0] = id;
        if (typeof requestProgress === "function") {
            const anchor = root().querySelector("#ti_trainer_train_result");
            const gallery = root().querySelector("#ti_trainer_previews"); // the WebUI shows live previews there
            const keepFollowing = () => followRun(3 * POLL_MS); // also while the job waits in the queue
            if (anchor) requestProgress(id, anchor, gallery, keepFollowing, keepFollowing);
        }
        followRun(WAIT_FOR_START_MS);
        return args;
    }

    window.ti_trainer_start_training = startTraining;

    // A run going on when the page opens (started in another browser tab) is shown by the tab's load event;
    // from then on it is followed here. A finished run is not polled: the load event showed it with its form.
    function followShownRun() {
        if (!timer && ACTIVE_STATES.includes(runState())) followRun(2 * POLL_MS);
    }

    function onPageChange() {
        applyTitles();
        followShownRun();
    }

    // The WebUI calls its onUiUpdate callbacks on every change of the page; elsewhere we watch it ourselves.
    if (typeof onUiUpdate === "function") {
        onUiUpdate(onPageChange);
    } else {
        const app = root();
        new MutationObserver(onPageChange).observe(app === document ? document.body : app, {
            childList: true,
            subtree: true,
        });
    }
    onPageChange(); // the page may be complete already (the standalone app runs this after it renders)
})();
