using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training.Data;
using FineTune.Worker.Training.Methods;

namespace FineTune.Worker.Training;

/// <summary>Where the loop stands: everything besides tensors that a resumed run needs to continue exactly.</summary>
public sealed record LoopState(long Step, DataPosition Position, long TokensSeen, double LossWindowSum, long LossWindowSteps);

/// <summary>
/// A checkpoint is one safetensors file, <c>step-&lt;n&gt;.safetensors</c>: the trainable tensors as
/// <c>adapter.&lt;PEFT name&gt;</c>, the optimizer state as <c>optim.&lt;key&gt;</c>, the method's own state if it has any
/// (<see cref="IAdapterMethod.MethodState"/>, e.g. XGBLoRA's merged boosters) as <c>method.&lt;key&gt;</c>, and in <c>__metadata__</c> the loop
/// state, seed, method and hyperparameters (to refuse a checkpoint of another job). Randomness needs no saved state:
/// each dropout mask is drawn from a generator seeded by (seed, step, micro-batch, layer).
/// </summary>
public static class Checkpoint
{
    public const string Format = "finetune-checkpoint";
    public const string Version = "1";
    public static readonly JsonSerializerOptions Json = new(JsonSerializerOptions.Web);

    public static string FileName(long step) => $"step-{step}.safetensors";

    public static string Write(string dir, LoopState state, IAdapterMethod method, AdamW optimizer, long seed,
                               Hyperparameters hyper, int trainExamples)
    {
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, FileName(state.Step));
        var optimState = optimizer.StateDict();
        var tensors = new Dictionary<string, Tensor>();
        foreach (var (name, t) in method.TrainableTensors.Concat(method.FrozenTensors)) tensors[$"adapter.{name}"] = t;
        foreach (var (key, t) in optimState) tensors[$"optim.{key}"] = t;
        var methodState = method.MethodState();
        foreach (var (key, t) in methodState) tensors[$"method.{key}"] = t;
        var inv = CultureInfo.InvariantCulture;
        var meta = new Dictionary<string, string>
        {
            ["format"] = Format,
            ["format_version"] = Version,
            ["step"] = state.Step.ToString(inv),
            ["epoch"] = state.Position.Epoch.ToString(inv),
            ["index"] = state.Position.Index.ToString(inv),
            ["tokens_seen"] = state.TokensSeen.ToString(inv),
            ["loss_window_sum"] = state.LossWindowSum.ToString("R", inv),
            ["loss_window_steps"] = state.LossWindowSteps.ToString(inv),
            ["seed"] = seed.ToString(inv),
            ["rng"] = "dropout masks seeded per (seed, step, micro-batch, layer)",
            ["train_examples"] = trainExamples.ToString(inv),
            ["method"] = JsonSerializer.Serialize(method.Spec, Json),
            ["hyperparameters"] = JsonSerializer.Serialize(hyper, Json),
        };
        try { Safetensors.Save(path, tensors, meta); }
        finally
        {
            // The optimizer's moment tensors are its own; its scalars and the method state are made for us.
            foreach (var (key, t) in optimState)
                if (key == "step" || key.EndsWith(".reset_at", StringComparison.Ordinal)) t.Dispose();
            foreach (var t in methodState.Values) t.Dispose();
        }
        return path;
    }

    /// <summary>Loads a checkpoint into the method and optimizer after checking it belongs to this job.</summary>
    public static LoopState Restore(string path, IAdapterMethod method, AdamW optimizer, Hyperparameters hyper, int trainExamples)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"checkpoint '{path}' does not exist", path);
        var meta = Safetensors.ReadMetadata(path);
        string Get(string key) => meta.TryGetValue(key, out var v) ? v
            : throw new InvalidDataException($"checkpoint '{path}' lacks metadata '{key}'");
        if (Get("format") != Format || Get("format_version") != Version)
            throw new InvalidDataException($"checkpoint '{path}' is not a {Format} v{Version} file");
        if (!JsonNode.DeepEquals(WrittenMethod(Get("method")), JsonSerializer.SerializeToNode(method.Spec, Json)))
            throw new InvalidDataException($"checkpoint '{path}' was written for method {Get("method")}, not for this job's method");
        if (!JsonNode.DeepEquals(JsonNode.Parse(Get("hyperparameters")), JsonSerializer.SerializeToNode(hyper, Json)))
            throw new InvalidDataException($"checkpoint '{path}' was written with hyperparameters {Get("hyperparameters")}, not this job's");
        if (Get("train_examples") != trainExamples.ToString(CultureInfo.InvariantCulture))
            throw new InvalidDataException($"checkpoint '{path}' was written for {Get("train_examples")} training examples, this job has {trainExamples}");

        var device = method.TrainableTensors.Count > 0 ? method.TrainableTensors[0].Tensor.Device : Device.Cpu;
        var tensors = Safetensors.Load(path, device);
        try
        {
            method.LoadTrainable(Strip(tensors, "adapter."));
            optimizer.LoadStateDict(Strip(tensors, "optim."));
            method.LoadMethodState(Strip(tensors, "method."));
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }

        var inv = CultureInfo.InvariantCulture;
        return new LoopState(long.Parse(Get("step"), inv),
            new DataPosition(int.Parse(Get("epoch"), inv), int.Parse(Get("index"), inv)),
            long.Parse(Get("tokens_seen"), inv), double.Parse(Get("loss_window_sum"), inv), long.Parse(Get("loss_window_steps"), inv));
    }

    /// <summary>The checkpoint's method with today's defaults filled in, so an option added since (a new field with a
    /// default, such as LoRA's <c>init</c>) does not orphan the checkpoints of jobs running across an upgrade.</summary>
    private static JsonNode? WrittenMethod(string json)
    {
        try { return JsonSerializer.SerializeToNode(JsonSerializer.Deserialize<MethodSpec>(json, Json), Json); }
        catch (Exception e) when (e is JsonException or NotSupportedException) { return JsonNode.Parse(json); }
    }

    private static Dictionary<string, Tensor> Strip(Dictionary<string, Tensor> tensors, string prefix) =>
        tensors.Where(kv => kv.Key.StartsWith(prefix, StringComparison.Ordinal))
               .ToDictionary(kv => kv.Key[prefix.Length..], kv => kv.Value);

    public static (string Sha256, long Size) Hash(string path)
    {
        using var stream = File.OpenRead(path);
        return (Convert.ToHexStringLower(SHA256.HashData(stream)), stream.Length);
    }
}
