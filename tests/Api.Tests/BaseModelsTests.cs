using System.Net;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain.Models;
using FineTune.Domain.Tenants;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tests;

/// <summary>The base-model registry: admin-only registration, listing and removal; names usable as a job's model.</summary>
public sealed class BaseModelsTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private string TinyFolder => Path.Combine(api.ModelsRoot, "tiny");
    private string WeightsSha => Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(Path.Combine(TinyFolder, "model.safetensors"))));

    private static Task<HttpResponseMessage> Register(HttpClient c, object body) =>
        c.PostAsync("/v1/admin/base-models", JsonContent.Create(body), Ct);

    [Fact]
    public async Task A_configured_model_is_seeded_with_its_shapes_and_checksum()
    {
        var admin = await api.ClientAsync("bm-admin");
        var list = await (await admin.GetAsync("/v1/admin/base-models", Ct)).JsonAsync();
        var seeded = list.EnumerateArray().Single(m => m.GetProperty("name").GetString() == "tiny-registered");
        Assert.Equal("config", seeded.GetProperty("source").GetString());
        Assert.Equal(new Uri(TinyFolder).AbsoluteUri, seeded.GetProperty("uri").GetString());
        Assert.Equal(WeightsSha, seeded.GetProperty("sha256").GetString());
        Assert.Equal("LlamaForCausalLM", seeded.GetProperty("architecture").GetString());
        Assert.Equal(64, seeded.GetProperty("hiddenSize").GetInt32());
        Assert.Equal(2, seeded.GetProperty("numLayers").GetInt32());
        Assert.Equal(259, seeded.GetProperty("vocabSize").GetInt32());
        Assert.Equal(2, seeded.GetProperty("numKeyValueHeads").GetInt32());
        var v = seeded.GetProperty("modules").EnumerateArray().Single(m => m.GetProperty("name").GetString() == "v_proj");
        Assert.Equal((32, 64), (v.GetProperty("out").GetInt32(), v.GetProperty("in").GetInt32()));

        // It cannot be removed over the API: it comes back at every start.
        Assert.Equal(HttpStatusCode.Conflict, (await admin.DeleteAsync("/v1/admin/base-models/tiny-registered", Ct)).StatusCode);
    }

    [Fact]
    public async Task An_admin_registers_a_local_model_and_jobs_use_it_by_name_with_its_checksum()
    {
        var admin = await api.ClientAsync("bm-admin");
        var response = await Register(admin, new { name = "tiny-local", uri = "file://" + TinyFolder });
        Assert.True(response.StatusCode == HttpStatusCode.Created, await response.Content.ReadAsStringAsync(Ct));
        Assert.Equal("/v1/admin/base-models/tiny-local", response.Headers.Location?.OriginalString);
        var created = await response.JsonAsync();
        Assert.Equal(WeightsSha, created.GetProperty("sha256").GetString());
        Assert.Equal(new FileInfo(Path.Combine(TinyFolder, "model.safetensors")).Length, created.GetProperty("weightsBytes").GetInt64());
        Assert.Equal("api", created.GetProperty("source").GetString());

        var member = await api.ClientAsync("bm-member", Roles.Member);
        var job = await member.PostAsync("/v1/fine-tunes", Requests.Body(Requests.LoraWith(o => o["model"] = "tiny-local")), Ct);
        Assert.True(job.StatusCode == HttpStatusCode.Accepted, await job.Content.ReadAsStringAsync(Ct));
        var id = (await job.JsonAsync()).GetProperty("id").GetGuid();
        await using var db = api.Db();
        var row = await db.Jobs.SingleAsync(j => j.Id == id, Ct);
        Assert.Equal("tiny-local", row.Model);
        Assert.Equal(TinyFolder, row.ModelPath);
        Assert.Equal(new Uri(TinyFolder).AbsoluteUri, row.ModelUri);
        Assert.Equal(WeightsSha, row.ModelSha256);

        // Members list the names (and shapes) but not where the models live.
        var names = await (await member.GetAsync("/v1/base-models", Ct)).JsonAsync();
        var entry = names.EnumerateArray().Single(m => m.GetProperty("name").GetString() == "tiny-local");
        Assert.False(entry.TryGetProperty("uri", out _));
        Assert.Equal(64, entry.GetProperty("hiddenSize").GetInt32());

        Assert.Equal(HttpStatusCode.Conflict, (await Register(admin, new { name = "tiny-local", uri = "file://" + TinyFolder })).StatusCode);
    }

    [Fact]
    public async Task Members_and_readers_may_not_administer_the_registry()
    {
        foreach (var role in new[] { Roles.Member, Roles.Reader })
        {
            var client = await api.ClientAsync("bm-member", role);
            foreach (var r in new[]
            {
                await Register(client, new { name = "nope", uri = "file://" + TinyFolder }),
                await client.GetAsync("/v1/admin/base-models", Ct),
                await client.GetAsync("/v1/admin/base-models/tiny-registered", Ct),
                await client.DeleteAsync("/v1/admin/base-models/tiny-registered", Ct),
            })
            {
                Assert.Equal(HttpStatusCode.Forbidden, r.StatusCode);
                Assert.Equal("application/problem+json", r.Content.Headers.ContentType?.MediaType);
            }
            Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/v1/base-models", Ct)).StatusCode);
        }
        Assert.Equal(HttpStatusCode.Unauthorized, (await api.CreateClient().GetAsync("/v1/base-models", Ct)).StatusCode);
        await using var db = api.Db();
        Assert.False(await db.BaseModels.AnyAsync(m => m.Name == "nope", Ct));
    }

    public static TheoryData<string, string, string, string> BadRegistrations() => new()
    {
        { "bad name", """{"name": "has space", "uri": "file://{tiny}"}""", "name", "must match" },
        { "bad sha256", """{"name": "x1", "uri": "file://{tiny}", "sha256": "abc"}""", "sha256", "64 hexadecimal" },
        { "wrong sha256", """{"name": "x2", "uri": "file://{tiny}", "sha256": "0000000000000000000000000000000000000000000000000000000000000000"}""", "sha256", "the weights in the folder have sha256" },
        { "outside the roots", """{"name": "x3", "uri": "file:///etc"}""", "uri", "outside the allowed storage roots" },
        { "missing folder", """{"name": "x4", "uri": "file://{models}/missing"}""", "uri", "not found" },
        { "no weights", """{"name": "x5", "uri": "file://{models}/no-weights"}""", "uri", "neither model.safetensors nor model.safetensors.index.json" },
        { "plain http", """{"name": "x6", "uri": "http://example.com/m/"}""", "uri", "plain http:// is not accepted" },
        { "private address", """{"name": "x7", "uri": "https://10.1.2.3/m/"}""", "uri", "resolves to 10.1.2.3, a private address" },
    };

    [Theory, MemberData(nameof(BadRegistrations))]
    public async Task Bad_registrations_are_refused_naming_the_field(string why, string body, string field, string message)
    {
        ApiFactory.WriteTinyModel(Path.Combine(api.ModelsRoot, "no-weights"));
        File.Delete(Path.Combine(api.ModelsRoot, "no-weights", "model.safetensors"));
        var admin = await api.ClientAsync("bm-admin");
        body = body.Replace("{tiny}", TinyFolder).Replace("{models}", api.ModelsRoot);
        var response = await admin.PostAsync("/v1/admin/base-models", Requests.Body(body), Ct);
        var text = await response.Content.ReadAsStringAsync(Ct);
        Assert.True(response.StatusCode == HttpStatusCode.UnprocessableEntity, $"{why}: {text}");
        var errors = JsonDocument.Parse(text).RootElement.GetProperty("errors");
        Assert.True(errors.TryGetProperty(field, out var list), $"{why}: {text}");
        Assert.Contains(message, list[0].GetString());
        var name = JsonDocument.Parse(body).RootElement.GetProperty("name").GetString();
        await using var db = api.Db();
        Assert.False(await db.BaseModels.AnyAsync(m => m.Name == name, Ct));
    }

    [Fact]
    public async Task Malformed_registration_bodies_are_400_naming_the_field()
    {
        var admin = await api.ClientAsync("bm-admin");
        var unknown = await (await admin.PostAsync("/v1/admin/base-models", Requests.Body("""{"name": "a", "uri": "x", "checksum": "y"}"""), Ct)).JsonAsync();
        Assert.Equal(400, unknown.GetProperty("status").GetInt32());
        Assert.True(unknown.GetProperty("errors").TryGetProperty("checksum", out _));
        var missing = await (await admin.PostAsync("/v1/admin/base-models", Requests.Body("""{"name": "a"}"""), Ct)).JsonAsync();
        Assert.True(missing.GetProperty("errors").TryGetProperty("uri", out _));
    }

    [Fact]
    public async Task Removing_a_name_and_changing_a_registered_folder()
    {
        var admin = await api.ClientAsync("bm-admin");
        var copy = Path.Combine(api.ModelsRoot, "tiny-copy");
        ApiFactory.WriteTinyModel(copy);
        Assert.Equal(HttpStatusCode.Created, (await Register(admin, new { name = "tiny-copy", uri = "file://" + copy })).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await admin.GetAsync("/v1/admin/base-models/tiny-copy", Ct)).StatusCode);

        // The folder's config changes after registration: submits are refused until it is registered again.
        ApiFactory.WriteTinyModel(copy, hiddenSize: 128);
        var member = await api.ClientAsync("bm-member", Roles.Member);
        var refused = await member.PostAsync("/v1/fine-tunes", Requests.Body(Requests.LoraWith(o => o["model"] = "tiny-copy")), Ct);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, refused.StatusCode);
        var error = (await refused.JsonAsync()).GetProperty("errors").GetProperty("model")[0].GetString();
        Assert.Contains("registered model 'tiny-copy' no longer matches its registration: hidden_size 128 (registered 64)", error);

        Assert.Equal(HttpStatusCode.NoContent, (await admin.DeleteAsync("/v1/admin/base-models/tiny-copy", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.NotFound, (await admin.DeleteAsync("/v1/admin/base-models/tiny-copy", Ct)).StatusCode);
        var gone = await admin.GetAsync("/v1/admin/base-models/tiny-copy", Ct);
        Assert.Equal(HttpStatusCode.NotFound, gone.StatusCode);
        Assert.Equal("application/problem+json", gone.Content.Headers.ContentType?.MediaType);

        // Now "tiny-copy" is just a folder name under the model roots again; an unknown name says where it looked.
        var unknown = await member.PostAsync("/v1/fine-tunes", Requests.Body(Requests.LoraWith(o => o["model"] = "llama-9000")), Ct);
        Assert.Contains("neither a registered base model", (await unknown.JsonAsync()).GetProperty("errors").GetProperty("model")[0].GetString());
    }

    [Fact]
    public void Sharded_weights_digest_is_the_sha256_of_the_sha256sum_listing()
    {
        var dir = Directory.CreateTempSubdirectory("ft-digest-").FullName;
        File.WriteAllText(Path.Combine(dir, WeightsDigest.IndexFile), """
            {"metadata": {}, "weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}
            """);
        File.WriteAllText(Path.Combine(dir, "model-00001-of-00002.safetensors"), "first");
        File.WriteAllText(Path.Combine(dir, "model-00002-of-00002.safetensors"), "second");
        string Sha(string s) => Convert.ToHexStringLower(SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(s)));
        // What `sha256sum model-*.safetensors | sha256sum` prints.
        var listing = $"{Sha("first")}  model-00001-of-00002.safetensors\n{Sha("second")}  model-00002-of-00002.safetensors\n";
        var (digest, files) = WeightsDigest.Compute(dir, Ct);
        Assert.Equal(Sha(listing), digest);
        Assert.Equal(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], files.Select(f => f.Name));

        File.WriteAllText(Path.Combine(dir, WeightsDigest.IndexFile), """{"weight_map": {"a": "../escape.safetensors"}}""");
        Assert.Throws<InvalidDataException>(() => WeightsDigest.Compute(dir, Ct));
        Directory.Delete(dir, true);
    }
}
