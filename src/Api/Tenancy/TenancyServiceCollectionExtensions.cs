using FineTune.Api.Webhooks;

namespace FineTune.Api.Tenancy;

public static class TenancyServiceCollectionExtensions
{
    /// <summary>Quota checks, webhook settings and the webhook delivery loop (section "Webhooks").</summary>
    public static IServiceCollection AddFineTuneTenancy(this IServiceCollection services, IConfiguration configuration)
    {
        services.Configure<WebhookOptions>(configuration.GetSection(WebhookOptions.Section));
        services.AddHostedService<WebhookDeliveryService>();
        return services;
    }
}
