using FineTune.Worker;
using Microsoft.Extensions.Hosting;
using FineTune.Worker.Training.Model;
using FineTune.Domain.Tokenizers;
using FineTune.Worker.Tools;

// FineTune.Worker bench micro|train|all …: benchmarks of the binding and the training step (Tools/BenchCommand.cs);
// FineTune.Worker bench compare …: every adapter method at a matched parameter budget (Tools/CompareCommand.cs).
if (args is ["bench", ..]) return await FineTune.Worker.Tools.BenchCommand.RunAsync(args[1..]);

// Besides running a worker node, the binary makes the demo's inputs (no download needed):
//   FineTune.Worker make-tiny-model <dir>     a tiny random Llama-style model folder with its byte-level tokenizer
//   FineTune.Worker make-sample-data <file>   a small prompt/completion JSONL dataset
//   FineTune.Worker parity ...                our logits and adapters for tests/parity/ (Tools/ParityCommand.cs)
switch (args)
{
    case ["parity", .. var rest]:
        return ParityCommand.Run(rest);
    case ["make-tiny-model", var dir]:
        TinyModel.Write(dir, seed: 1234);
        TinyTokenizer.WriteFiles(dir);
        Console.WriteLine($"tiny model written to {Path.GetFullPath(dir)}");
        return 0;
    case ["make-sample-data", var file]:
        SampleData.Write(file);
        Console.WriteLine($"sample dataset written to {Path.GetFullPath(file)}");
        return 0;
    case [var verb, ..] when !verb.StartsWith('-'):
        Console.Error.WriteLine($"unknown command '{verb}'. Commands: make-tiny-model <dir>, make-sample-data <file>, {ParityCommand.Usage}; no command runs the worker node.");
        return 2;
}

using var host = WorkerHost.CreateBuilder(args).Build();
await host.RunAsync();
return 0;
