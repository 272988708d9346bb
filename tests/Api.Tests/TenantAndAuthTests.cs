using System.IO.Compression;
using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using FineTune.Domain.Adapters;
using FineTune.Domain.Persistence;
using FineTune.Domain.Tenants;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tests;

public sealed class TenantAndAuthTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    /// <summary>An adapter folder with two files and its row, as the job runner would register it.</summary>
    private async Task<Adapter> AddAdapterAsync(string tenant, string name, int version)
    {
        var folder = Path.Combine("adapters", tenant, name, version.ToString());
        var full = Path.Combine(api.ArtifactRoot, folder);
        Directory.CreateDirectory(Path.Combine(full, "lora"));
        var files = new Dictionary<string, byte[]>
        {
            ["adapter_config.json"] = """{"r": 8, "peft_type": "LORA"}"""u8.ToArray(),
            ["lora/adapter_model.safetensors"] = RandomNumberGenerator.GetBytes(50_000),
        };
        foreach (var (path, bytes) in files) await File.WriteAllBytesAsync(Path.Combine(full, path), bytes, Ct);
        await File.WriteAllTextAsync(Path.Combine(full, "not-listed.txt"), "stray file", Ct);
        var adapter = new Adapter
        {
            TenantId = await api.TenantIdAsync(tenant), Name = name, Version = version, MethodType = "lora", BaseModel = "tiny",
            Path = folder,
            Files = [.. files.Select(f => new AdapterFile(f.Key, f.Value.Length, Convert.ToHexStringLower(SHA256.HashData(f.Value))))],
            Metadata = new() { ["finalLoss"] = 0.5 },
        };
        await using var db = api.Db();
        db.Adapters.Add(adapter);
        await db.SaveChangesAsync(Ct);
        return adapter;
    }

    [Fact]
    public async Task Adapters_are_listed_fetched_and_downloaded_as_a_zip_of_their_files()
    {
        var client = await api.ClientAsync("adapters");
        var v1 = await AddAdapterAsync("adapters", "helper", 1);
        var v2 = await AddAdapterAsync("adapters", "helper", 2);
        await AddAdapterAsync("adapters", "other", 1);

        var list = await (await client.GetAsync("/v1/adapters?name=helper", Ct)).JsonAsync();
        Assert.Equal([v2.Id, v1.Id], list.GetProperty("data").EnumerateArray().Select(a => a.GetProperty("id").GetGuid()));
        Assert.Equal(3, (await (await client.GetAsync("/v1/adapters", Ct)).JsonAsync()).GetProperty("data").GetArrayLength());

        var one = await (await client.GetAsync($"/v1/adapters/{v2.Id}", Ct)).JsonAsync();
        Assert.Equal(2, one.GetProperty("version").GetInt32());
        Assert.Equal(2, one.GetProperty("files").GetArrayLength());

        var download = await client.GetAsync($"/v1/adapters/{v2.Id}/download", Ct);
        Assert.Equal(HttpStatusCode.OK, download.StatusCode);
        Assert.Equal("application/zip", download.Content.Headers.ContentType?.MediaType);
        Assert.Equal("helper-v2.zip", download.Content.Headers.ContentDisposition?.FileName?.Trim('"'));
        using var zip = new ZipArchive(await download.Content.ReadAsStreamAsync(Ct));
        Assert.Equal(["adapter_config.json", "lora/adapter_model.safetensors"], zip.Entries.Select(e => e.FullName).Order());
        foreach (var f in v2.Files)
        {
            await using var s = zip.GetEntry(f.Path)!.Open();
            Assert.Equal(f.Sha256, Convert.ToHexStringLower(await SHA256.HashDataAsync(s, Ct)));
        }

        // A file that changed on disk since registration is refused before streaming.
        await File.WriteAllTextAsync(Path.Combine(api.ArtifactRoot, v1.Path, "adapter_config.json"), "{}", Ct);
        Assert.Equal(HttpStatusCode.Conflict, (await client.GetAsync($"/v1/adapters/{v1.Id}/download", Ct)).StatusCode);
    }

    [Fact]
    public async Task Another_tenant_sees_nothing_of_tenant_a()
    {
        var a = await api.ClientAsync("tenant-a");
        var b = await api.ClientAsync("tenant-b");
        var job = (await (await a.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct)).JsonAsync()).GetProperty("id").GetGuid();
        var adapter = await AddAdapterAsync("tenant-a", "secret", 1);

        foreach (var url in new[]
        {
            $"/v1/fine-tunes/{job}", $"/v1/fine-tunes/{job}/events", $"/v1/fine-tunes/{job}/metrics",
            $"/v1/fine-tunes/{job}/checkpoints", $"/v1/adapters/{adapter.Id}", $"/v1/adapters/{adapter.Id}/download",
        })
        {
            var r = await b.GetAsync(url, Ct);
            Assert.True(r.StatusCode == HttpStatusCode.NotFound, $"{url}: {r.StatusCode}");
            Assert.Equal("application/problem+json", r.Content.Headers.ContentType?.MediaType);
            Assert.Equal(HttpStatusCode.OK, (await a.GetAsync(url, Ct)).StatusCode);
        }
        Assert.Equal(HttpStatusCode.NotFound, (await b.PostAsync($"/v1/fine-tunes/{job}/cancel", null, Ct)).StatusCode);
        Assert.Equal(0, (await (await b.GetAsync("/v1/fine-tunes", Ct)).JsonAsync()).GetProperty("data").GetArrayLength());
        Assert.Equal(0, (await (await b.GetAsync("/v1/adapters", Ct)).JsonAsync()).GetProperty("data").GetArrayLength());
        Assert.Equal(1, (await (await a.GetAsync("/v1/fine-tunes", Ct)).JsonAsync()).GetProperty("data").GetArrayLength());
        // Tenant A's job is still queued: B's cancel did nothing.
        Assert.Equal("queued", (await (await a.GetAsync($"/v1/fine-tunes/{job}", Ct)).JsonAsync()).GetProperty("status").GetString());
    }

    [Fact]
    public async Task Requests_without_a_valid_key_are_401_problems()
    {
        var anonymous = api.CreateClient();
        var revokedKey = await api.KeyAsync("auth");
        var expiredKey = await api.KeyAsync("auth");
        await using (var db = api.Db())
        {
            var revoked = await db.ApiKeys.SingleAsync(k => k.Hash == ApiKeys.Hash(revokedKey), Ct);
            revoked.RevokedAt = DateTimeOffset.UtcNow;
            var expired = await db.ApiKeys.SingleAsync(k => k.Hash == ApiKeys.Hash(expiredKey), Ct);
            expired.ExpiresAt = DateTimeOffset.UtcNow.AddMinutes(-1);
            await db.SaveChangesAsync(Ct);
        }
        var validButUnknown = ApiKeys.Generate();
        var samePrefixOtherKey = revokedKey[..ApiKeys.PrefixLength] + ApiKeys.Generate()[ApiKeys.PrefixLength..];

        foreach (var (auth, expect) in new (string?, string)[]
        {
            (null, "Send an API key"), ("Basic dXNlcjpwYXNz", "Bearer"), ("Bearer nonsense", "not valid"),
            ($"Bearer {validButUnknown}", "not valid"), ($"Bearer {samePrefixOtherKey}", "not valid"),
            ($"Bearer {revokedKey}", "revoked"), ($"Bearer {expiredKey}", "expired"),
        })
        {
            var request = new HttpRequestMessage(HttpMethod.Get, "/v1/fine-tunes");
            if (auth is not null) request.Headers.TryAddWithoutValidation("Authorization", auth);
            var r = await anonymous.SendAsync(request, Ct);
            Assert.True(r.StatusCode == HttpStatusCode.Unauthorized, $"{auth}: {r.StatusCode}");
            Assert.Equal("application/problem+json", r.Content.Headers.ContentType?.MediaType);
            Assert.Contains(expect, (await r.JsonAsync()).GetProperty("detail").GetString());
        }
        Assert.Equal(HttpStatusCode.Unauthorized, (await anonymous.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct)).StatusCode);
    }

    [Fact]
    public async Task A_reader_can_read_but_not_submit_or_cancel()
    {
        var admin = await api.ClientAsync("roles");
        var reader = await api.ClientAsync("roles", Roles.Reader);
        var job = (await (await admin.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct)).JsonAsync()).GetProperty("id").GetGuid();

        var post = await reader.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct);
        Assert.Equal(HttpStatusCode.Forbidden, post.StatusCode);
        Assert.Equal("application/problem+json", post.Content.Headers.ContentType?.MediaType);
        Assert.Equal(HttpStatusCode.Forbidden, (await reader.PostAsync($"/v1/fine-tunes/{job}/cancel", null, Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await reader.GetAsync($"/v1/fine-tunes/{job}", Ct)).StatusCode);
    }

    [Fact]
    public async Task The_bootstrap_key_is_an_admin_of_the_bootstrap_tenant_and_bootstrapping_is_idempotent()
    {
        var client = api.CreateClient();
        client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", api.BootstrapKey);
        Assert.Equal(HttpStatusCode.Accepted, (await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct)).StatusCode);

        await using var db = api.Db();
        var tenant = await db.EnsureTenantKeyAsync("bootstrap", api.BootstrapKey, Roles.Admin, Ct);
        Assert.Equal(1, await db.Tenants.CountAsync(t => t.Name == "bootstrap", Ct));
        var key = await db.ApiKeys.SingleAsync(k => k.TenantId == tenant.Id, Ct);
        Assert.Equal(Roles.Admin, key.Role);
        Assert.Equal(api.BootstrapKey[..8], key.Prefix);
        Assert.NotEqual(api.BootstrapKey, key.Hash);
    }
}
