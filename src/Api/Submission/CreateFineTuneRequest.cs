using System.ComponentModel;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;

namespace FineTune.Api.Submission;

/// <summary>A fine-tune job to run.</summary>
/// <param name="Model">A registered model name (config "Models"), a folder name under a model root, or a
/// <c>file:///…</c> folder under a model root; the folder holds the Hugging Face config.json and weights.</param>
/// <param name="TrainingData">JSONL dataset: <c>file:///…</c> under a data root, or a path relative to one.</param>
/// <param name="Method">Adapter method and its options, chosen by <c>type</c> (<c>lora</c>, <c>dora</c>, <c>bone</c>, …).</param>
/// <param name="AdapterName">Name of the adapter to create (a new version per job): <c>^[a-z0-9][a-z0-9._-]{0,63}$</c>.</param>
/// <param name="ValidationData">Optional JSONL dataset evaluated during training.</param>
/// <param name="Hyperparameters">Training hyperparameters; every field has a default.</param>
/// <param name="Pool">Worker pool to run on (one of the configured pools; default the first).</param>
/// <param name="Priority">low, normal (default) or high: order among queued jobs of a pool.</param>
/// <param name="Merge">Also publish the base model with the adapter merged in, as a Hugging Face model folder
/// <c>merged/</c> (config.json, model.safetensors in the base checkpoint's dtype, tokenizer files) beside the adapter.
/// It is a full copy of the base model (e.g. ~13.5 GB for a 7B bf16 model) on the artifact volume and in the
/// adapter's download; the job fails with a clear message if the volume lacks the room. Default false.</param>
public sealed record CreateFineTuneRequest(
    string Model,
    string TrainingData,
    MethodSpec Method,
    string AdapterName,
    string? ValidationData = null,
    Hyperparameters? Hyperparameters = null,
    string? Pool = null,
    [property: DefaultValue("normal")] string? Priority = null,
    [property: DefaultValue(false)] bool Merge = false);

public static class Priorities
{
    public const string Low = "low", Normal = "normal", High = "high";
    public static readonly string[] All = [Low, Normal, High];

    /// <summary>Quartz trigger priority (its default is 5).</summary>
    public static int ToInt(string name) => name switch { Low => 1, High => 10, _ => 5 };
    public static string ToName(int value) => value switch { <= 1 => Low, >= 10 => High, _ => Normal };
}
