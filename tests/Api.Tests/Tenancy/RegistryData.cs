using System.Security.Cryptography;
using System.Text;
using FineTune.Domain.Adapters;

namespace FineTune.Api.Tests.Tenancy;

/// <summary>Adapter versions on disk and in the registry, as the job runner publishes them.</summary>
public static class RegistryData
{
    public static async Task<Adapter> AddAsync(ApiFactory api, string tenant, string task, int version, string method = "lora",
        string baseModel = "tiny", double finalLoss = 1.0, string[]? tags = null, int weightBytes = 50_000)
    {
        var folder = Path.Combine("adapters", tenant, task, $"v{version}");
        var full = Path.Combine(api.ArtifactRoot, folder);
        Directory.CreateDirectory(Path.Combine(full, "lora"));
        var files = new SortedDictionary<string, byte[]>(StringComparer.Ordinal)
        {
            ["adapter_config.json"] = Encoding.UTF8.GetBytes($$"""{"peft_type": "{{method.ToUpperInvariant()}}", "r": 8}"""),
            ["adapter_model.safetensors"] = RandomNumberGenerator.GetBytes(weightBytes),
            ["lora/adapter_config.json"] = """{"peft_type": "LORA", "r": 8}"""u8.ToArray(),
            ["lora/adapter_model.safetensors"] = RandomNumberGenerator.GetBytes(weightBytes / 2),
            ["metadata.json"] = Encoding.UTF8.GetBytes($$"""{"final_loss": {{finalLoss}}, "steps": 10}"""),
        };
        foreach (var (path, bytes) in files) await File.WriteAllBytesAsync(Path.Combine(full, path), bytes);
        var adapter = new Adapter
        {
            TenantId = await api.TenantIdAsync(tenant), Name = task, Version = version, MethodType = method, BaseModel = baseModel,
            Path = folder, Tags = [.. tags ?? []],
            Files = [.. files.Select(f => new AdapterFile(f.Key, f.Value.Length, Convert.ToHexStringLower(SHA256.HashData(f.Value))))],
            Metadata = new() { ["final_loss"] = finalLoss, ["steps"] = 10 },
            Method = $$"""{"type": "{{method}}", "r": 8}""", Hyperparameters = """{"epochs": 1}""",
            BaseModelSha256 = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(baseModel))),
            DatasetUri = "file:///data/train.jsonl", DatasetSha256 = new string('d', 64),
            FinalLoss = finalLoss, SizeBytes = files.Values.Sum(b => (long)b.Length),
        };
        await using var db = api.Db();
        db.Adapters.Add(adapter);
        await db.SaveChangesAsync();
        return adapter;
    }

    public static string FullPath(ApiFactory api, Adapter a, string file) => Path.Combine(api.ArtifactRoot, a.Path, file);
}
