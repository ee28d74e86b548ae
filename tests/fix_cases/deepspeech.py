"""DeepSpeech2 as deepspeech.pytorch writes it (model.py, shrunk): convolutions over the
spectrogram, then recurrent layers over (T, N, H) whose BatchNorm1d is wrapped in SequenceWise,
which flattens time into the batch: the BatchNorm sees (T*N, H), T rows per sample."""

import torch.nn as nn


class SequenceWise(nn.Module):
    def __init__(self, module):
        """Collapses input of dim T*N*H to (T*N)*H, and applies to a module.
        Allows handling of variable sequence lengths and minibatch sizes.
        :param module: Module to apply input to.
        """
        super().__init__()
        self.module = module

    def forward(self, x):
        t, n = x.size(0), x.size(1)
        x = x.view(t * n, -1)
        x = self.module(x)
        x = x.view(t, n, -1)
        return x


class BatchRNN(nn.Module):
    def __init__(self, input_size, hidden_size, rnn_type=nn.LSTM, bidirectional=False, batch_norm=True):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bidirectional = bidirectional
        self.batch_norm = SequenceWise(nn.BatchNorm1d(input_size)) if batch_norm else None
        self.rnn = rnn_type(input_size=input_size, hidden_size=hidden_size, bidirectional=bidirectional, bias=True)

    def forward(self, x):
        if self.batch_norm is not None:
            x = self.batch_norm(x)
        x, _h = self.rnn(x)
        if self.bidirectional:
            x = x.view(x.size(0), x.size(1), 2, -1).sum(2).view(x.size(0), x.size(1), -1)  # (TxNxH*2) -> (TxNxH) by sum
        return x


class DeepSpeech(nn.Module):
    def __init__(self, n_feats=32, rnn_hidden_size=64, nb_layers=3, num_classes=29, bidirectional=True):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=(41, 11), stride=(2, 2), padding=(20, 5)),
            nn.BatchNorm2d(32),
            nn.Hardtanh(0, 20, inplace=True),
            nn.Conv2d(32, 32, kernel_size=(21, 11), stride=(2, 1), padding=(10, 5)),
            nn.BatchNorm2d(32),
            nn.Hardtanh(0, 20, inplace=True),
        )
        # Based on above convolutions and spectrogram size using conv formula (W - F + 2P)/ S+1
        rnn_input_size = (n_feats + 2 * 20 - 41) // 2 + 1
        rnn_input_size = (rnn_input_size + 2 * 10 - 21) // 2 + 1
        rnn_input_size *= 32

        self.rnns = nn.Sequential(
            BatchRNN(input_size=rnn_input_size, hidden_size=rnn_hidden_size, bidirectional=bidirectional, batch_norm=False),
            *(BatchRNN(input_size=rnn_hidden_size, hidden_size=rnn_hidden_size, bidirectional=bidirectional) for _ in range(nb_layers - 1)),
        )
        fully_connected = nn.Sequential(nn.BatchNorm1d(rnn_hidden_size), nn.Linear(rnn_hidden_size, num_classes, bias=False))
        self.fc = nn.Sequential(SequenceWise(fully_connected))

    def forward(self, x):
        x = self.conv(x)  # (N, 1, F, T) -> (N, C, F', T)
        sizes = x.size()
        x = x.view(sizes[0], sizes[1] * sizes[2], sizes[3])  # Collapse feature dimension
        x = x.transpose(1, 2).transpose(0, 1).contiguous()  # TxNxH
        x = self.rnns(x)
        x = self.fc(x)
        return x.transpose(0, 1)  # NxTxH


def build():
    return DeepSpeech()


def deepspeech_wide():
    return DeepSpeech(n_feats=48, rnn_hidden_size=96, nb_layers=2)


INPUT_SHAPE = (2, 1, 32, 12)  # (N, 1, F, T): 12 time steps
# other models built from the lines the fix rewrites, each with its example input (they must equal convert's)
SIBLINGS = {"DeepSpeech, 96 hidden, 48 features": ("deepspeech_wide", (2, 1, 48, 10))}
