# The two commands of the README:
#   make demo   build the embedded default dataset, train a small model, evaluate it, decode;
#               then the shipped model reads a seeded sample of test formulas (SEED=N repeats one)
#   make test   run the test suite
# Both install what they need first (.ci/install: apt TeX packages, pip requirements).

PYTHON  ?= python3
DATA    ?= datasets/default
RUN     ?= runs/default
FORMULAS ?= 4000
MINUTES ?= 6
SMALL   := --emb_dim 64 --dec_rnn_h 192 --enc_out_dim 192 --cnn_widths 32 64 128 128 \
           --add_position_features

.PHONY: demo test lint setup setup-dev

setup:
	PYTHON=$(PYTHON) bash .ci/install requirements.txt

setup-dev:
	EXTRA_APT_PACKAGES="chromium chromium-driver" PYTHON=$(PYTHON) \
	    bash .ci/install requirements-dev.txt

demo: setup
	$(PYTHON) preprocess.py --generate $(FORMULAS) --data_path $(DATA) --quiet
	$(PYTHON) build_vocab.py --data_path $(DATA)
	$(PYTHON) train.py --data_path $(DATA) --save_dir $(RUN) $(SMALL) --lr 1e-3 --overwrite \
	    --epoches 100 --max_minutes $(MINUTES) --quiet --print_freq 50
	$(PYTHON) evaluate.py --data_path $(DATA) --split test --model_path $(RUN) \
	    --beam_size 3 --ref_path $(RUN)/test_ref.txt --result_path $(RUN)/test_result.txt --quiet
	@img=$$(head -n 1 $(DATA)/im2latex_test_filter.lst | cut -d' ' -f1); \
	  echo "inference on $(DATA)/formula_images_processed/$$img:"; \
	  $(PYTHON) inference.py --model_path $(RUN) $(DATA)/formula_images_processed/$$img
	@echo; echo "That model trained for minutes. The shipped one, checkpoints/im2latex.pt:"
	$(PYTHON) demo.py $(if $(SEED),--seed $(SEED))

test: setup-dev
	$(PYTHON) -m pytest tests

lint:
	ruff check .
